fn main() {
    let path = std::env::args().nth(1).unwrap();
    let src = std::fs::read_to_string(&path).unwrap();
    match flashc_dsl::load(&src) {
        Ok((spec, w)) => {
            print!("{}", flashc_dsl::diag::render(&path, &src, &w));
            println!("{}", serde_json::to_string_pretty(&spec).unwrap());
        }
        Err(d) => print!("{}", flashc_dsl::diag::render(&path, &src, &d)),
    }
}
