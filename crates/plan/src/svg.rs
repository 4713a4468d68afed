//! The memory breakdown of candidate layouts as stacked bars against the GPU's capacity
//! (`tessera plan --svg FILE`): one bar per layout, best first, with the card's capacity as a
//! solid line and the usable share as a dashed one.

use std::fmt::Write;

use crate::memory::MemoryBytes;
use crate::search::{Estimate, Evaluated, Plan, GIB};

const PARTS: [(&str, &str); 6] = [
    ("weights", "#4e79a7"),
    ("gradients", "#f28e2b"),
    ("optimizer", "#e15759"),
    ("activations", "#76b7b2"),
    ("buffers", "#59a14f"),
    ("kv_cache", "#edc948"),
];

fn parts(b: &MemoryBytes) -> [u64; 6] {
    [
        b.weights,
        b.gradients,
        b.optimizer,
        b.activations,
        b.buffers,
        b.kv_cache,
    ]
}

fn bytes(e: &Evaluated) -> MemoryBytes {
    match &e.estimate {
        Estimate::Train { memory, .. } => memory.bytes,
        Estimate::Infer { memory, .. } => memory.bytes,
    }
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// An SVG of the first `max_bars` layouts of the plan (those that fit, then the closest others).
pub fn to_svg(p: &Plan, max_bars: usize) -> String {
    let shown: Vec<&Evaluated> = p.layouts.iter().take(max_bars.max(1)).collect();
    let capacity = p.request.cluster.gpu_mem_bytes;
    let top = shown
        .iter()
        .map(|e| bytes(e).total)
        .max()
        .unwrap_or(0)
        .max(capacity) as f64
        * 1.05;
    let (left, bar_w, gap, plot_h, plot_top) = (70.0, 46.0, 24.0, 320.0, 40.0);
    let width = left + shown.len() as f64 * (bar_w + gap) + 170.0;
    let height = plot_top + plot_h + 110.0;
    let y = |b: f64| plot_top + plot_h - b / top * plot_h;
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0}" height="{height:.0}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="20" font-size="14">{} — memory per GPU by layout</text>"#,
        escape(&p.request.model.name)
    );
    // Axis with a tick every nice step of GiB.
    let top_gib = top / GIB;
    let step = [10.0, 20.0, 40.0, 80.0, 160.0, 320.0, 640.0, 1280.0]
        .into_iter()
        .find(|s| top_gib / s <= 8.0)
        .unwrap_or(2560.0);
    let mut tick = 0.0;
    while tick <= top_gib {
        let ty = y(tick * GIB);
        let _ = writeln!(
            s,
            r##"<line x1="{:.0}" x2="{:.0}" y1="{ty:.1}" y2="{ty:.1}" stroke="#ddd"/><text x="{:.0}" y="{:.1}" text-anchor="end">{tick:.0}</text>"##,
            left - 4.0,
            width - 170.0,
            left - 8.0,
            ty + 4.0
        );
        tick += step;
    }
    let _ = writeln!(
        s,
        r#"<text x="14" y="{:.0}" transform="rotate(-90 14 {:.0})">GiB per GPU</text>"#,
        plot_top + plot_h / 2.0,
        plot_top + plot_h / 2.0
    );
    for (i, e) in shown.iter().enumerate() {
        let x = left + gap / 2.0 + i as f64 * (bar_w + gap);
        let mut base = 0.0;
        for (v, (name, color)) in parts(&bytes(e)).into_iter().zip(PARTS) {
            if v == 0 {
                continue;
            }
            let (y0, y1) = (y(base), y(base + v as f64));
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{y1:.1}" width="{bar_w}" height="{:.1}" fill="{color}"><title>{name}: {:.2} GiB</title></rect>"#,
                (y0 - y1).max(0.0),
                v as f64 / GIB
            );
            base += v as f64;
        }
        let label = format!("dp{} tp{} pp{}", e.layout.dp, e.layout.tp, e.layout.pp);
        let sub = if matches!(e.estimate, Estimate::Train { .. }) {
            format!("z{} {}", e.layout.zero, e.layout.offload.name())
        } else {
            String::new()
        };
        let mark = match e.rank {
            Some(r) => format!("#{r}"),
            None => "no fit".into(),
        };
        let ly = plot_top + plot_h;
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.0}" text-anchor="middle">{label}</text><text x="{:.1}" y="{:.0}" text-anchor="middle">{sub}</text><text x="{:.1}" y="{:.0}" text-anchor="middle">{mark}</text>"#,
            x + bar_w / 2.0,
            ly + 16.0,
            x + bar_w / 2.0,
            ly + 30.0,
            x + bar_w / 2.0,
            ly + 44.0
        );
    }
    let x_end = width - 170.0;
    let cy = y(capacity as f64);
    let uy = y(p.usable_bytes as f64);
    let _ = writeln!(
        s,
        r##"<line x1="{left}" x2="{x_end:.0}" y1="{cy:.1}" y2="{cy:.1}" stroke="#000" stroke-width="1.5"/><text x="{:.0}" y="{:.1}">capacity {:.1} GiB</text>"##,
        x_end + 4.0,
        cy + 4.0,
        capacity as f64 / GIB
    );
    let _ = writeln!(
        s,
        r##"<line x1="{left}" x2="{x_end:.0}" y1="{uy:.1}" y2="{uy:.1}" stroke="#000" stroke-dasharray="4 3"/><text x="{:.0}" y="{:.1}">usable {:.1} GiB</text>"##,
        x_end + 4.0,
        uy + 14.0,
        p.usable_bytes as f64 / GIB
    );
    for (i, (name, color)) in PARTS.iter().enumerate() {
        let ly = plot_top + 40.0 + i as f64 * 18.0;
        let _ = writeln!(
            s,
            r#"<rect x="{:.0}" y="{ly:.0}" width="12" height="12" fill="{color}"/><text x="{:.0}" y="{:.0}">{name}</text>"#,
            x_end + 4.0,
            x_end + 22.0,
            ly + 10.0
        );
    }
    s.push_str("</svg>\n");
    s
}
