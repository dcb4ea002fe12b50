package main

import (
	"fmt"
	"image/color"
	"path/filepath"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/text"
	"gonum.org/v1/plot/vg"
)

// barChart is a grouped bar chart: one group per x label, one bar per
// series in each, with optional min–max whiskers and value labels.
type barChart struct {
	title, ylabel string
	groups        []string
	series        []barSeries
	refLine       float64 // a dashed horizontal line at this y, if > 0
	format        string  // of the value labels, e.g. "%.1f s"
}

type barSeries struct {
	name  string
	color int // index into palette, so a mode keeps its colour

	values []float64 // one per group; 0 for none
	lows   []float64 // whisker ends, or nil for none
	highs  []float64
}

// palette has a colour for each mode (plotutil's has 7, fewer than the
// modes, so two modes shared one): plotutil.SoftColors, then a teal, a
// grey and an olive.
var palette = []color.Color{
	color.RGBA{241, 90, 96, 255},
	color.RGBA{122, 195, 106, 255},
	color.RGBA{90, 155, 212, 255},
	color.RGBA{250, 167, 91, 255},
	color.RGBA{158, 103, 171, 255},
	color.RGBA{206, 112, 88, 255},
	color.RGBA{215, 127, 180, 255},
	color.RGBA{77, 182, 172, 255},
	color.RGBA{140, 140, 140, 255},
	color.RGBA{170, 170, 60, 255},
}

// whiskers are min–max error bars at the bars' centres.
type whiskers struct{ x, y, lo, hi []float64 }

func (w whiskers) Len() int                        { return len(w.x) }
func (w whiskers) XY(i int) (float64, float64)     { return w.x[i], w.y[i] }
func (w whiskers) YError(i int) (float64, float64) { return w.y[i] - w.lo[i], w.hi[i] - w.y[i] }

// Chart size; bar widths are given in points, so the bench computes them
// from the width the groups share.
const (
	chartWidth  = 8 * vg.Inch
	chartHeight = 4.5 * vg.Inch
	axisMargin  = 70 // points left of and right of the data area, about
)

// save draws the chart into a PNG file at path.
func (c barChart) save(path string) error {
	p := plot.New()
	p.Title.Text = c.title
	p.Y.Label.Text = c.ylabel
	p.Legend.Top = true
	n, k := float64(len(c.groups)), float64(len(c.series))
	slot := 0.8 / k // data units per bar
	pointsPerUnit := (chartWidth - axisMargin) / vg.Length(n)
	top := c.refLine
	for j, s := range c.series {
		bars, err := plotter.NewBarChart(plotter.Values(s.values), vg.Length(slot*0.9)*pointsPerUnit)
		if err != nil {
			return fmt.Errorf("chart %s: %w", c.title, err)
		}
		bars.XMin = (float64(j) - (k-1)/2) * slot
		bars.Color = palette[s.color%len(palette)]
		bars.LineStyle.Width = 0
		p.Add(bars)
		p.Legend.Add(s.name, bars)

		labels := plotter.XYLabels{XYs: make(plotter.XYs, len(s.values)), Labels: make([]string, len(s.values))}
		w := whiskers{}
		for i, v := range s.values {
			x := bars.XMin + float64(i)
			y := v
			if s.lows != nil && v > 0 {
				w.x, w.y = append(w.x, x), append(w.y, v)
				w.lo, w.hi = append(w.lo, s.lows[i]), append(w.hi, s.highs[i])
				y = s.highs[i]
			}
			labels.XYs[i] = plotter.XY{X: x, Y: y}
			if v > 0 {
				labels.Labels[i] = fmt.Sprintf(c.format, v)
			}
			top = max(top, y)
		}
		if len(w.x) > 0 {
			eb, err := plotter.NewYErrorBars(w)
			if err != nil {
				return fmt.Errorf("chart %s: %w", c.title, err)
			}
			p.Add(eb)
		}
		lb, err := plotter.NewLabels(labels)
		if err != nil {
			return fmt.Errorf("chart %s: %w", c.title, err)
		}
		for i := range lb.TextStyle {
			lb.TextStyle[i].Font.Size = vg.Points(7)
			lb.TextStyle[i].XAlign = text.XCenter
		}
		lb.Offset = vg.Point{Y: 2}
		p.Add(lb)
	}
	if c.refLine > 0 {
		ref := plotter.NewFunction(func(float64) float64 { return c.refLine })
		ref.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
		ref.Color = color.Gray{Y: 90}
		p.Add(ref)
	}
	p.NominalX(c.groups...)
	p.X.Min, p.X.Max = -0.5, n-0.5
	p.Y.Min, p.Y.Max = 0, top*1.25 // room for the labels and the legend
	if err := p.Save(chartWidth, chartHeight, path); err != nil {
		return fmt.Errorf("save chart %s: %w", filepath.Base(path), err)
	}
	return nil
}
