//! The `cuda` device as far as it can be tested without a GPU: a machine without a driver gets a clear
//! error, never a panic. With a driver, the device opens and reports its memory.

use flashc_runtime::cuda::{Cuda, driver_present};

#[test]
fn without_a_driver_the_device_is_a_clear_error() {
    if driver_present() {
        eprintln!("a CUDA driver is present: checking the device opens instead");
        let dev = Cuda::new(0).expect("open GPU 0");
        let (free, total) = dev.memory().expect("memory");
        assert!(free <= total && total > 0);
        return;
    }
    let e = Cuda::new(0).err().expect("no driver");
    assert!(e.to_string().contains("no CUDA driver found"), "{e}");
}
