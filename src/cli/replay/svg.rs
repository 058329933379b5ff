//! What the replays' SVG charts share: the canvas, its two panels, and text escaping. The
//! charts are written by hand: a few polylines, bars and labels, where a plotting crate
//! would add a font and raster stack to a scheduler binary.

pub(super) const WIDTH: f64 = 1000.0;
pub(super) const HEIGHT: f64 = 480.0;
pub(super) const TOP: f64 = 40.0;
pub(super) const BOTTOM: f64 = 56.0;
pub(super) const PANEL_WIDTH: f64 = 340.0;
pub(super) const LEFT_PANEL_X: f64 = 64.0;
pub(super) const RIGHT_PANEL_X: f64 = 470.0;
pub(super) const LEGEND_X: f64 = 830.0;

pub(super) fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}
