//! The replay chart as a standalone SVG: GPU allocation against arrived load, one line
//! per policy (the mean over seeds). Written by hand: it is a few polylines and labels,
//! and a plotting crate would add a font and raster stack to a scheduler binary.

use super::replay::Summary;

const WIDTH: f64 = 820.0;
const HEIGHT: f64 = 520.0;
const LEFT: f64 = 64.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 56.0;
const COLOURS: [&str; 8] = ["#7f7f7f", "#9467bd", "#8c564b", "#e377c2", "#1f77b4", "#ff7f0e", "#d62728", "#2ca02c"];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

pub fn chart(summary: &Summary) -> String {
    let x_max = crate::replay::ARRIVED_PCT_MAX as f64;
    let plot_w = WIDTH - LEFT - RIGHT;
    let plot_h = HEIGHT - TOP - BOTTOM;
    let x = |arrived: f64| LEFT + arrived / x_max * plot_w;
    let y = |allocation: f64| TOP + (1.0 - allocation / 100.0) * plot_h;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{LEFT}\" y=\"22\" font-size=\"14\">GPU allocation vs arrived load: {} ({} nodes, {} GPUs, {} seeds)</text>\n",
        escape(summary.pods.rsplit('/').next().unwrap_or(&summary.pods)),
        summary.nodes,
        summary.gpus,
        summary.seeds.len()
    );
    for tick in (0..=130).step_by(10) {
        let px = x(f64::from(tick));
        svg.push_str(&format!(
            "<line x1=\"{px:.1}\" y1=\"{TOP}\" x2=\"{px:.1}\" y2=\"{:.1}\" stroke=\"#e6e6e6\"/>\
             <text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{tick}</text>\n",
            TOP + plot_h,
            TOP + plot_h + 16.0
        ));
    }
    for tick in (0..=100).step_by(10) {
        let py = y(f64::from(tick));
        svg.push_str(&format!(
            "<line x1=\"{LEFT}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#e6e6e6\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{tick}</text>\n",
            LEFT + plot_w,
            LEFT - 6.0,
            py + 4.0
        ));
    }
    svg.push_str(&format!(
        "<rect x=\"{LEFT}\" y=\"{TOP}\" width=\"{plot_w}\" height=\"{plot_h}\" fill=\"none\" stroke=\"#333\"/>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">arrived GPU request (% of capacity)</text>\n\
         <text transform=\"translate(18,{:.1}) rotate(-90)\" text-anchor=\"middle\">GPU allocation (% of capacity)</text>\n",
        LEFT + plot_w / 2.0,
        HEIGHT - 14.0,
        TOP + plot_h / 2.0
    ));
    for (index, policy) in summary.policies.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let points: Vec<String> = policy
            .mean_curve
            .iter()
            .enumerate()
            .filter_map(|(arrived, value)| value.map(|v| format!("{:.1},{:.1}", x(arrived as f64), y(v))))
            .collect();
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.6\" points=\"{}\"/>\n",
            points.join(" ")
        ));
        let label_y = TOP + 14.0 + 20.0 * index as f64;
        let last = policy.mean_curve.last().copied().flatten().map_or("-".to_string(), |v| format!("{v:.2}%"));
        svg.push_str(&format!(
            "<line x1=\"{:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{colour}\" stroke-width=\"3\"/>\
             <text x=\"{:.1}\" y=\"{label_y:.1}\">{} {last}</text>\n",
            LEFT + plot_w + 12.0,
            label_y - 4.0,
            LEFT + plot_w + 32.0,
            label_y - 4.0,
            LEFT + plot_w + 38.0,
            escape(&policy.policy)
        ));
    }
    svg.push_str("</svg>\n");
    svg
}
