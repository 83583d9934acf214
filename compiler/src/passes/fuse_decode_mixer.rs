//! fuse-decode-mixer: (not yet written).

use crate::gir::Graph;

pub fn run(_g: &mut Graph) -> Result<bool, String> {
    Ok(false)
}
