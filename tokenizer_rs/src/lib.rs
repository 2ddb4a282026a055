use pyo3::prelude::*;

#[pymodule]
fn _rustbpe(_m: &Bound<'_, PyModule>) -> PyResult<()> {
    Ok(())
}
