//! The training report: every step's metrics as CSV, the loss curve as a PNG, and a
//! Markdown summary that links both.

use plotters::prelude::*;
use std::fmt::Write;

use crate::trainer::StepMetrics;
use crate::TrainError;

/// Every step's metrics as CSV (the header names the columns).
pub fn metrics_csv(history: &[StepMetrics]) -> String {
    let mut s = String::from(
        "step,epoch,loss,valid_loss,lr,grad_norm,tokens,label_tokens,tokens_per_s,gpu_mem_bytes,elapsed_s\n",
    );
    for m in history {
        let _ = writeln!(
            s,
            "{},{:.4},{:.6},{},{:.3e},{:.4},{},{},{:.1},{},{:.1}",
            m.step,
            m.epoch,
            m.loss,
            m.valid_loss.map(|v| format!("{v:.6}")).unwrap_or_default(),
            m.lr,
            m.grad_norm,
            m.tokens,
            m.label_tokens,
            m.tokens_per_s,
            m.gpu_mem_bytes.map(|b| b.to_string()).unwrap_or_default(),
            m.elapsed_s
        );
    }
    s
}

fn register_font() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        // The font is embedded, so rendering needs no system fonts.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            epaint_default_fonts::UBUNTU_LIGHT,
        );
    });
}

/// The training (and validation) loss per step as a PNG.
pub fn loss_png(history: &[StepMetrics], title: &str) -> Result<Vec<u8>, TrainError> {
    register_font();
    let (w, h) = (900u32, 500u32);
    let mut rgb = vec![0u8; (w * h * 3) as usize];
    let err = |e: String| TrainError::Export(format!("loss curve: {e}"));
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| err(e.to_string()))?;
        let train: Vec<(f64, f64)> = history
            .iter()
            .map(|m| (m.step as f64, m.loss))
            .filter(|p| p.1.is_finite())
            .collect();
        let valid: Vec<(f64, f64)> = history
            .iter()
            .filter_map(|m| m.valid_loss.map(|v| (m.step as f64, v)))
            .filter(|p| p.1.is_finite())
            .collect();
        let xmax = history
            .last()
            .map(|m| m.step as f64)
            .unwrap_or(1.0)
            .max(1.0);
        let all = train.iter().chain(&valid).map(|p| p.1);
        let ymax = all.clone().fold(0.0f64, f64::max).max(1e-3) * 1.05;
        let ymin = all.fold(f64::INFINITY, f64::min).min(ymax) * 0.95;
        let ymin = if ymin.is_finite() { ymin.max(0.0) } else { 0.0 };
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22))
            .margin(16)
            .x_label_area_size(40)
            .y_label_area_size(56)
            .build_cartesian_2d(0.0..xmax, ymin..ymax)
            .map_err(|e| err(e.to_string()))?;
        chart
            .configure_mesh()
            .x_desc("optimizer step")
            .y_desc("loss (per label token)")
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        chart
            .draw_series(LineSeries::new(train, BLUE.stroke_width(2)))
            .map_err(|e| err(e.to_string()))?
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLUE.stroke_width(2)));
        if !valid.is_empty() {
            chart
                .draw_series(LineSeries::new(valid.clone(), RED.stroke_width(2)))
                .map_err(|e| err(e.to_string()))?
                .label("valid")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], RED.stroke_width(2)));
            chart
                .draw_series(valid.iter().map(|p| Circle::new(*p, 3, RED.filled())))
                .map_err(|e| err(e.to_string()))?;
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .label_font(("sans-serif", 14))
            .draw()
            .map_err(|e| err(e.to_string()))?;
        root.present().map_err(|e| err(e.to_string()))?;
    }
    let mut png = Vec::new();
    {
        let mut enc = png::Encoder::new(&mut png, w, h);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header().map_err(|e| err(e.to_string()))?;
        writer
            .write_image_data(&rgb)
            .map_err(|e| err(e.to_string()))?;
    }
    Ok(png)
}
