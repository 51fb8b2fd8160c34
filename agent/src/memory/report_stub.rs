use super::profile::{Profile, Stack};
pub fn site(_p: &Profile, s: &Stack) -> usize {
    s.frames[0]
}
pub fn text(_p: &Profile, _top: usize) -> String {
    String::new()
}
pub fn folded(_p: &Profile, _c: usize) -> String {
    String::new()
}
pub fn svg(_p: &Profile, _c: usize) -> anyhow::Result<Vec<u8>> {
    Ok(vec![])
}
pub fn pprof(_p: &Profile) -> anyhow::Result<Vec<u8>> {
    Ok(vec![])
}
pub fn human_bytes(b: f64) -> String {
    format!("{b}")
}
