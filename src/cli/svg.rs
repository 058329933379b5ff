//! The replay chart as a standalone SVG: GPU allocation against arrived load, one line
//! per policy (the mean over seeds), the whole run on the left and the saturated end
//! zoomed on the right, where the policies differ. Written by hand: it is a few polylines
//! and labels, and a plotting crate would add a font and raster stack to a scheduler binary.

use super::replay::Summary;
use topoplace_replay::pods::ARRIVED_PCT_MAX;

const WIDTH: f64 = 1000.0;
const HEIGHT: f64 = 480.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 56.0;
const PANEL_WIDTH: f64 = 340.0;
const LEFT_PANEL_X: f64 = 64.0;
const RIGHT_PANEL_X: f64 = 470.0;
const LEGEND_X: f64 = 830.0;
/// Where the zoomed panel starts, in arrived percent.
const ZOOM_FROM: usize = 80;
const COLOURS: [&str; 8] = ["#7f7f7f", "#9467bd", "#8c564b", "#e377c2", "#1f77b4", "#ff7f0e", "#d62728", "#2ca02c"];

fn escape(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;").replace('"', "&quot;")
}

/// A plot area and the data ranges it shows.
struct Panel {
    left: f64,
    x_range: (f64, f64),
    y_range: (f64, f64),
    x_step: usize,
    y_step: f64,
}

impl Panel {
    fn x(&self, arrived: f64) -> f64 {
        self.left + (arrived - self.x_range.0) / (self.x_range.1 - self.x_range.0) * PANEL_WIDTH
    }

    fn y(&self, allocation: f64) -> f64 {
        let plot_h = HEIGHT - TOP - BOTTOM;
        TOP + (1.0 - (allocation - self.y_range.0) / (self.y_range.1 - self.y_range.0)) * plot_h
    }

    fn draw(&self, svg: &mut String, summary: &Summary) {
        let bottom = HEIGHT - BOTTOM;
        for tick in (self.x_range.0 as usize..=self.x_range.1 as usize).step_by(self.x_step) {
            let px = self.x(tick as f64);
            svg.push_str(&format!(
                "<line x1=\"{px:.1}\" y1=\"{TOP}\" x2=\"{px:.1}\" y2=\"{bottom:.1}\" stroke=\"#e6e6e6\"/>\
                 <text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{tick}</text>\n",
                bottom + 16.0
            ));
        }
        let mut tick = self.y_range.0;
        while tick <= self.y_range.1 + 1e-9 {
            let py = self.y(tick);
            svg.push_str(&format!(
                "<line x1=\"{:.1}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#e6e6e6\"/>\
                 <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{tick}</text>\n",
                self.left,
                self.left + PANEL_WIDTH,
                self.left - 6.0,
                py + 4.0
            ));
            tick += self.y_step;
        }
        for (index, policy) in summary.policies.iter().enumerate() {
            let points: Vec<String> = policy
                .mean_curve
                .iter()
                .enumerate()
                .filter(|&(arrived, _)| arrived as f64 >= self.x_range.0)
                .filter_map(|(arrived, value)| {
                    value.map(|v| format!("{:.1},{:.1}", self.x(arrived as f64), self.y(v.max(self.y_range.0))))
                })
                .collect();
            svg.push_str(&format!(
                "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.6\" points=\"{}\"/>\n",
                COLOURS[index % COLOURS.len()],
                points.join(" ")
            ));
        }
        svg.push_str(&format!(
            "<rect x=\"{}\" y=\"{TOP}\" width=\"{PANEL_WIDTH}\" height=\"{:.1}\" fill=\"none\" stroke=\"#333\"/>\n\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">arrived GPU request (% of capacity)</text>\n",
            self.left,
            HEIGHT - TOP - BOTTOM,
            self.left + PANEL_WIDTH / 2.0,
            HEIGHT - 14.0
        ));
    }
}

/// The zoomed panel's allocation range: whole points around the curves past `ZOOM_FROM`.
fn zoom_range(summary: &Summary) -> (f64, f64) {
    let values: Vec<f64> =
        summary.policies.iter().flat_map(|p| p.mean_curve.iter().skip(ZOOM_FROM).flatten().copied()).collect();
    let low = values.iter().copied().fold(f64::INFINITY, f64::min);
    let high = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !low.is_finite() || !high.is_finite() {
        return (0.0, 100.0);
    }
    ((low - 1.0).floor().max(0.0), (high + 1.0).ceil().min(100.0))
}

pub fn chart(summary: &Summary) -> String {
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{LEFT_PANEL_X}\" y=\"22\" font-size=\"14\">GPU allocation (% of capacity) vs arrived load: {} \
         ({} nodes, {} GPUs, mean of {} seeds)</text>\n\
         <text x=\"{RIGHT_PANEL_X}\" y=\"{:.1}\" fill=\"#555\">zoomed: from {ZOOM_FROM}% arrived</text>\n",
        escape(summary.pods.rsplit('/').next().unwrap_or(&summary.pods)),
        summary.nodes,
        summary.gpus,
        summary.seeds.len(),
        TOP - 4.0
    );
    let whole = Panel {
        left: LEFT_PANEL_X,
        x_range: (0.0, ARRIVED_PCT_MAX as f64),
        y_range: (0.0, 100.0),
        x_step: 20,
        y_step: 10.0,
    };
    let (low, high) = zoom_range(summary);
    let zoomed = Panel {
        left: RIGHT_PANEL_X,
        x_range: (ZOOM_FROM as f64, ARRIVED_PCT_MAX as f64),
        y_range: (low, high),
        x_step: 10,
        y_step: ((high - low) / 10.0).ceil().max(1.0),
    };
    whole.draw(&mut svg, summary);
    zoomed.draw(&mut svg, summary);
    for (index, policy) in summary.policies.iter().enumerate() {
        let colour = COLOURS[index % COLOURS.len()];
        let label_y = TOP + 14.0 + 20.0 * index as f64;
        let last = policy.mean_curve.last().copied().flatten().map_or("-".to_string(), |v| format!("{v:.2}%"));
        svg.push_str(&format!(
            "<line x1=\"{LEGEND_X}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{colour}\" stroke-width=\"3\"/>\
             <text x=\"{:.1}\" y=\"{label_y:.1}\">{} {last}</text>\n",
            label_y - 4.0,
            LEGEND_X + 20.0,
            label_y - 4.0,
            LEGEND_X + 26.0,
            escape(&policy.policy)
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

const SPREAD_COLOURS: [&str; 3] = ["#2ca02c", "#ff7f0e", "#d62728"];
/// Per policy in the job chart: none of them a spread colour.
const POLICY_COLOURS: [&str; 6] = ["#1f77b4", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#17becf"];

/// The job replay: GPU utilisation over time per policy (left) and where each policy put
/// its multi-host jobs (right), with the mean queueing delay beside each bar.
pub fn jobs_chart(report: &super::jobs::JobReport) -> String {
    let plot_h = HEIGHT - TOP - BOTTOM;
    let bottom = HEIGHT - BOTTOM;
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{WIDTH}\" height=\"{HEIGHT}\" viewBox=\"0 0 {WIDTH} {HEIGHT}\" \
         font-family=\"sans-serif\" font-size=\"12\">\n<rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{LEFT_PANEL_X}\" y=\"22\" font-size=\"13\">{}: {} hosts, {} GPUs, load x{}, {}</text>\n",
        escape(report.jobs_file.rsplit('/').next().unwrap_or(&report.jobs_file)),
        report.hosts,
        report.gpus,
        report.load_factor,
        report.queue.name()
    );
    // Left: utilisation (%) against replay hours.
    let hours = report.results.iter().map(|r| r.makespan_s / 3600.0).fold(0.0, f64::max).max(1e-9);
    let peak = report.results.iter().flat_map(|r| r.timeline.iter().copied()).fold(0.0, f64::max);
    let y_max = ((peak * 100.0 / 10.0).ceil() * 10.0).clamp(10.0, 100.0);
    let x = |h: f64| LEFT_PANEL_X + h / hours * PANEL_WIDTH;
    let y = |pct: f64| TOP + (1.0 - pct / y_max) * plot_h;
    for step in 0..=5 {
        let pct = y_max * f64::from(step) / 5.0;
        let hour = hours * f64::from(step) / 5.0;
        svg.push_str(&format!(
            "<line x1=\"{LEFT_PANEL_X}\" y1=\"{py:.1}\" x2=\"{:.1}\" y2=\"{py:.1}\" stroke=\"#e6e6e6\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{pct:.0}</text>\
             <text x=\"{px:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{hour:.1}</text>\n",
            LEFT_PANEL_X + PANEL_WIDTH,
            LEFT_PANEL_X - 6.0,
            y(pct) + 4.0,
            bottom + 16.0,
            py = y(pct),
            px = x(hour),
        ));
    }
    for (index, result) in report.results.iter().enumerate() {
        let slice = result.makespan_s / 3600.0 / result.timeline.len().max(1) as f64;
        let points: Vec<String> = result
            .timeline
            .iter()
            .enumerate()
            .map(|(i, u)| format!("{:.1},{:.1}", x((i as f64 + 0.5) * slice), y(u * 100.0)))
            .collect();
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"1.4\" points=\"{}\"/>\n",
            POLICY_COLOURS[index % POLICY_COLOURS.len()],
            points.join(" ")
        ));
    }
    svg.push_str(&format!(
        "<rect x=\"{LEFT_PANEL_X}\" y=\"{TOP}\" width=\"{PANEL_WIDTH}\" height=\"{plot_h:.1}\" fill=\"none\" stroke=\"#333\"/>\n\
         <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">hours of replay; GPU utilisation (%)</text>\n",
        LEFT_PANEL_X + PANEL_WIDTH / 2.0,
        HEIGHT - 14.0
    ));
    // Right: one bar per policy, split by where its multi-host jobs landed.
    let row_h = plot_h / report.results.len().max(1) as f64;
    let bar_w = PANEL_WIDTH - 60.0;
    for (index, result) in report.results.iter().enumerate() {
        let top = TOP + row_h * index as f64 + row_h * 0.2;
        let colour = POLICY_COLOURS[index % POLICY_COLOURS.len()];
        svg.push_str(&format!(
            "<rect x=\"{:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{colour}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{} (mean wait {:.0} s)</text>\n",
            RIGHT_PANEL_X,
            top - 11.0,
            RIGHT_PANEL_X + 14.0,
            top - 2.0,
            escape(result.policy.name()),
            result.mean_queue_delay_s
        ));
        let total = result.multi_host_jobs.max(1) as f64;
        let mut left = RIGHT_PANEL_X;
        for (part, count) in
            [result.multi_host_in_one_rack, result.multi_host_in_one_block, result.multi_host_across_blocks]
                .into_iter()
                .enumerate()
        {
            let width = bar_w * count as f64 / total;
            svg.push_str(&format!(
                "<rect x=\"{left:.1}\" y=\"{top:.1}\" width=\"{width:.1}\" height=\"{:.1}\" fill=\"{}\"/>\n",
                row_h * 0.45,
                SPREAD_COLOURS[part]
            ));
            left += width;
        }
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{:.1}\">{:.1}%</text>\n",
            RIGHT_PANEL_X + bar_w + 6.0,
            top + row_h * 0.3,
            100.0 * result.rack_share()
        ));
    }
    for (part, label) in ["in one rack", "one block, several racks", "across blocks"].iter().enumerate() {
        let lx = RIGHT_PANEL_X + [0.0, 110.0, 290.0][part];
        svg.push_str(&format!(
            "<rect x=\"{lx:.1}\" y=\"{:.1}\" width=\"10\" height=\"10\" fill=\"{}\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\">{label}</text>\n",
            HEIGHT - 24.0,
            SPREAD_COLOURS[part],
            lx + 14.0,
            HEIGHT - 15.0
        ));
    }
    svg.push_str(&format!(
        "<text x=\"{RIGHT_PANEL_X}\" y=\"{:.1}\" fill=\"#555\">multi-host jobs: share in one rack</text>\n</svg>\n",
        TOP - 22.0
    ));
    svg
}
