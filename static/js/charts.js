// The job page's charts, drawn with uPlot (vendored, loaded as the global `uPlot`): loss
// against learning rate with the suggestions, band and early stop marked; the sweep's
// validation loss per candidate peak; the recommended schedule over the planned steps; and a
// race's validation curves, one per recipe.

import { loss as fmtLoss, lr as fmtLr, tick } from './format.js';

const uPlot = window.uPlot;

export const SUGGESTION_STYLE = {
  valley: { color: '#2a9d8f', rule: "fastai's default: the middle of the longest fall" },
  steepest: { color: '#e76f51', rule: 'steepest fall of the smoothed loss' },
  minimum: { color: '#8e44ad', rule: 'lowest smoothed loss ÷ 10' },
  edge: { color: '#b5651d', rule: 'lowest smoothed loss: where it stops improving' },
};
const RAW = '#9db4d3';
const SMOOTHED = '#1f4e8c';
const PEAK = '#c0392b';
const UNSTABLE = '#d35400';
const BAND = 'rgba(46, 160, 67, 0.13)';
const RUNNING = '#6c757d';
const AXIS_FONT = '12px system-ui, sans-serif';

function chartHeight(container) {
  return container.clientWidth < 500 ? 230 : 300;
}

/** A log-10 axis labelled only at powers of ten, as 1e-3. */
function logAxis(label) {
  return {
    label,
    font: AXIS_FONT,
    labelFont: AXIS_FONT,
    space: 40,
    values: (u, splits) =>
      splits.map((value) => {
        const exponent = Math.log10(value);
        return Math.abs(exponent - Math.round(exponent)) < 1e-9 ? fmtLr(value, 1) : '';
      }),
  };
}

/** An accuracy tick as a percentage: `97.5 %`. */
function percentTick(value) {
  return Number.isFinite(value) ? `${Number((value * 100).toPrecision(3))} %` : '';
}

function valueAxis(label, options = {}) {
  return {
    label,
    font: AXIS_FONT,
    labelFont: AXIS_FONT,
    size: 56,
    values: (u, splits) => splits.map(tick),
    ...options,
  };
}

/** Keeps a chart as wide as its container. */
function followWidth(plot, container) {
  const observer = new ResizeObserver(() => {
    const width = container.clientWidth;
    if (width > 0 && Math.abs(width - plot.width) > 1) {
      plot.setSize({ width, height: chartHeight(container) });
    }
  });
  observer.observe(container);
}

function pxRatio() {
  return uPlot.pxRatio || window.devicePixelRatio || 1;
}

/** Shades [from, to] on the x scale across the plotting area. */
function shadeBand(u, band, color) {
  if (!band) return;
  const { ctx, bbox } = u;
  const left = Math.max(bbox.left, u.valToPos(band[0], 'x', true));
  const right = Math.min(bbox.left + bbox.width, u.valToPos(band[1], 'x', true));
  if (!(right > left)) return;
  ctx.save();
  ctx.fillStyle = color;
  ctx.fillRect(left, bbox.top, right - left, bbox.height);
  ctx.restore();
}

/** A vertical line at `x` with a label near the top; `row` staggers labels that would collide. */
function markX(u, x, color, label, row, dashed) {
  const { ctx, bbox } = u;
  const pos = u.valToPos(x, 'x', true);
  if (!(pos >= bbox.left - 1 && pos <= bbox.left + bbox.width + 1)) return;
  const ratio = pxRatio();
  ctx.save();
  ctx.strokeStyle = color;
  ctx.lineWidth = 1.5 * ratio;
  if (dashed) ctx.setLineDash([5 * ratio, 4 * ratio]);
  ctx.beginPath();
  ctx.moveTo(pos, bbox.top);
  ctx.lineTo(pos, bbox.top + bbox.height);
  ctx.stroke();
  ctx.setLineDash([]);
  ctx.font = `${Math.round(11 * ratio)}px system-ui, sans-serif`;
  // uPlot leaves the alignment of the axis it drew last (right, for the y axis); the label's
  // place below is worked out for left-aligned text.
  ctx.textAlign = 'left';
  ctx.fillStyle = color;
  const width = ctx.measureText(label).width;
  const right = bbox.left + bbox.width;
  const textX = pos + 4 * ratio + width > right ? pos - 4 * ratio - width : pos + 4 * ratio;
  ctx.fillText(label, textX, bbox.top + (12 + 13 * row) * ratio);
  ctx.restore();
}

function markPoint(u, x, y, color, label) {
  if (!Number.isFinite(y)) return;
  const { ctx, bbox } = u;
  const ratio = pxRatio();
  const px = u.valToPos(x, 'x', true);
  const py = Math.min(Math.max(u.valToPos(y, 'y', true), bbox.top), bbox.top + bbox.height);
  ctx.save();
  ctx.strokeStyle = color;
  ctx.fillStyle = '#fff';
  ctx.lineWidth = 2 * ratio;
  ctx.beginPath();
  ctx.arc(px, py, 5 * ratio, 0, 2 * Math.PI);
  ctx.fill();
  ctx.stroke();
  ctx.font = `${Math.round(11 * ratio)}px system-ui, sans-serif`;
  ctx.textAlign = 'left';
  ctx.fillStyle = color;
  const width = ctx.measureText(label).width;
  ctx.fillText(label, Math.max(bbox.left, px - width - 8 * ratio), py - 8 * ratio);
  ctx.restore();
}

/**
 * The range test: raw and smoothed loss on a log learning-rate axis. `update(points, marks)`
 * redraws; `marks` holds `xRange` ([start_lr, end_lr]) and, once known, `suggestions`,
 * `band`, `peak` and `stoppedEarly`.
 */
export function rangeChart(container) {
  let plot = null;
  let marks = {};

  function draw(u) {
    const labels = Object.entries(marks.suggestions || {})
      .filter(([, value]) => Number.isFinite(value))
      .sort((a, b) => a[1] - b[1]);
    // Staggered rows: neighbours closer than ~a label width go one row down.
    let row = 0;
    let lastPos = -Infinity;
    for (const [name, value] of labels) {
      const pos = u.valToPos(value, 'x', true);
      row = pos - lastPos < 90 * pxRatio() ? row + 1 : 0;
      lastPos = pos;
      markX(u, value, SUGGESTION_STYLE[name].color, `${name} ${fmtLr(value)}`, row, true);
    }
    if (Number.isFinite(marks.peak)) {
      markX(u, marks.peak, PEAK, `peak ${fmtLr(marks.peak)}`, labels.length > 0 ? 4 : 0, false);
    }
    if (marks.stoppedEarly) {
      const xs = u.data[0];
      const smoothed = u.data[2];
      const last = xs.length - 1;
      if (last >= 0) markPoint(u, xs[last], smoothed[last], '#d35400', 'stopped early');
    }
  }

  function yRange(u) {
    // The loss explodes where training diverges: the top is kept at twice the span the
    // smoothed loss covers before that (the last tenth), so the useful region stays readable
    // and the divergence runs off the top.
    const smoothed = (u.data[2] || []).filter(Number.isFinite);
    const all = (u.data[1] || []).concat(smoothed).filter(Number.isFinite);
    if (all.length === 0) return [0, 1];
    const low = Math.min(...all);
    const settled = smoothed.slice(0, Math.max(1, Math.floor(smoothed.length * 0.9)));
    const reference = Math.max(...settled);
    const top = Math.min(Math.max(...all), reference + (reference - low));
    const pad = (top - low) * 0.05 || Math.abs(top) * 0.05 || 1;
    return [low - pad, top + pad];
  }

  function create(data) {
    const width = container.clientWidth || 600;
    plot = new uPlot(
      {
        width,
        height: chartHeight(container),
        scales: {
          // The whole tested range when known, so a running test fills it from the left and
          // an early stop shows how far short of end_lr it fell.
          x: { time: false, distr: 3, log: 10, range: (u, min, max) => marks.xRange || [min, max] },
          y: { range: yRange },
        },
        axes: [logAxis('learning rate (log scale)'), valueAxis('training loss')],
        series: [
          { label: 'learning rate', value: (u, v) => fmtLr(v) },
          { label: 'loss (raw)', stroke: RAW, width: 1, value: (u, v) => fmtLoss(v) },
          { label: 'loss (smoothed)', stroke: SMOOTHED, width: 2, value: (u, v) => fmtLoss(v) },
        ],
        hooks: {
          drawClear: [(u) => shadeBand(u, marks.band, BAND)],
          draw: [draw],
        },
        legend: { live: true },
        cursor: { drag: { x: false, y: false } },
      },
      data,
      container,
    );
    followWidth(plot, container);
  }

  return {
    update(points, newMarks) {
      if (newMarks) marks = newMarks;
      const usable = points.filter((point) => point.lr > 0);
      if (usable.length < 2) return false;
      const data = [
        usable.map((point) => point.lr),
        usable.map((point) => (Number.isFinite(point.loss) ? point.loss : null)),
        usable.map((point) => (Number.isFinite(point.smoothed) ? point.smoothed : null)),
      ];
      if (plot) plot.setData(data);
      else create(data);
      return true;
    },
  };
}

/**
 * The sweep: mean validation loss per candidate peak at the horizon the winner was judged at
 * (the longest), the shorter screening runs beside it, best marked, band shaded, unstable
 * candidates marked and the stability edge drawn (dashed) where it is inside the plot.
 */
export function sweepChart(container) {
  let plot = null;
  let marks = {};
  return {
    update(candidates, newMarks) {
      if (newMarks) marks = newMarks;
      const finite = candidates.filter((c) => c.peak_lr > 0 && Number.isFinite(c.val_loss));
      if (finite.length === 0) return false;
      const finalSteps = Math.max(...finite.map((c) => c.steps || 0));
      const peaks = [...new Set(finite.map((c) => c.peak_lr))].sort((a, b) => a - b);
      const lossAt = (peak, atFinal) => {
        const found = finite.find((c) => c.peak_lr === peak && ((c.steps || 0) === finalSteps) === atFinal);
        return found ? found.val_loss : null;
      };
      const bestAt = (peak) => {
        const found = finite.find((c) => c.peak_lr === peak && c.best);
        return found ? found.val_loss : null;
      };
      // An unstable peak at its longest horizon.
      const unstableAt = (peak) => {
        const runs = finite.filter((c) => c.peak_lr === peak && c.unstable);
        if (runs.length === 0) return null;
        return runs.reduce((a, b) => ((b.steps || 0) > (a.steps || 0) ? b : a)).val_loss;
      };
      const data = [
        peaks,
        peaks.map((peak) => lossAt(peak, true)),
        peaks.map((peak) => lossAt(peak, false)),
        peaks.map(bestAt),
        peaks.map(unstableAt),
      ];
      if (plot) {
        plot.setData(data);
        return true;
      }
      const point = (fill, size) => ({ show: true, size, fill, stroke: fill });
      plot = new uPlot(
        {
          width: container.clientWidth || 400,
          height: chartHeight(container),
          scales: {
            x: {
              time: false,
              distr: 3,
              log: 10,
              // One candidate alone still needs a visible range around it.
              range: (u, min, max) => [min / 3, max * 3],
            },
            y: {
              range: (u, min, max) => {
                const pad = (max - min) * 0.15 || Math.abs(max) * 0.1 || 1;
                return [min - pad, max + pad];
              },
            },
          },
          axes: [logAxis('peak learning rate (log scale)'), valueAxis('validation loss')],
          series: [
            { label: 'peak LR', value: (u, v) => fmtLr(v) },
            {
              label: 'validation loss',
              stroke: SMOOTHED,
              width: 1.5,
              spanGaps: true,
              points: point(SMOOTHED, 7),
              value: (u, v) => fmtLoss(v),
            },
            {
              label: 'screening (shorter runs)',
              stroke: RAW,
              width: 1,
              dash: [4, 4],
              spanGaps: true,
              points: point(RAW, 5),
              value: (u, v) => fmtLoss(v),
            },
            {
              label: 'best',
              stroke: PEAK,
              width: 0,
              points: point(PEAK, 11),
              value: (u, v) => fmtLoss(v),
            },
            {
              label: 'unstable',
              stroke: UNSTABLE,
              width: 0,
              points: point(UNSTABLE, 9),
              value: (u, v) => fmtLoss(v),
            },
          ],
          hooks: {
            drawClear: [(u) => shadeBand(u, marks.band, BAND)],
            draw: [
              (u) => {
                if (Number.isFinite(marks.peak)) markX(u, marks.peak, PEAK, `peak ${fmtLr(marks.peak)}`, 0, false);
                if (Number.isFinite(marks.edge)) markX(u, marks.edge, UNSTABLE, `edge ${fmtLr(marks.edge)}`, 1, true);
                // The candidates training now, dotted.
                (marks.running || []).forEach((peak, index) => markX(u, peak, RUNNING, index === 0 ? 'running' : '', 2, true));
              },
            ],
          },
          cursor: { drag: { x: false, y: false } },
        },
        data,
        container,
      );
      followWidth(plot, container);
      return true;
    },
  };
}

/** Learning rate (left axis) and momentum (right axis) per optimizer step. */
export function scheduleChart(container, curve) {
  const steps = curve.lr.map((_, index) => index + 1);
  const hasMomentum = Array.isArray(curve.momentum) && curve.momentum.some(Number.isFinite);
  const series = [
    { label: 'step' },
    { label: 'learning rate', stroke: PEAK, width: 2, scale: 'lr', value: (u, v) => fmtLr(v, 3) },
  ];
  const axes = [
    { label: 'optimizer step', font: AXIS_FONT, labelFont: AXIS_FONT },
    {
      label: 'learning rate',
      scale: 'lr',
      font: AXIS_FONT,
      labelFont: AXIS_FONT,
      size: 60,
      values: (u, splits) => splits.map(tick),
    },
  ];
  const data = [steps, curve.lr];
  if (hasMomentum) {
    series.push({
      label: 'momentum',
      stroke: SMOOTHED,
      width: 1.5,
      dash: [6, 4],
      scale: 'momentum',
      value: (u, v) => (Number.isFinite(v) ? v.toFixed(3) : '–'),
    });
    axes.push({
      label: 'momentum',
      scale: 'momentum',
      side: 1,
      font: AXIS_FONT,
      labelFont: AXIS_FONT,
      size: 56,
      grid: { show: false },
      values: (u, splits) => splits.map((value) => value.toFixed(2)),
    });
    data.push(curve.momentum);
  }
  const plot = new uPlot(
    {
      width: container.clientWidth || 400,
      height: chartHeight(container),
      scales: {
        x: { time: false },
        lr: { range: (u, min, max) => [0, max * 1.05] },
        momentum: {
          range: (u, min, max) => {
            const pad = (max - min) * 0.1 || 0.05;
            return [min - pad, max + pad];
          },
        },
      },
      axes,
      series,
      cursor: { drag: { x: false, y: false } },
    },
    data,
    container,
  );
  followWidth(plot, container);
  return plot;
}

/** A race curve's values from its quarter-way evaluation on (at least from its second). */
function settledValues(values) {
  const finite = values.filter(Number.isFinite);
  return finite.length > 1 ? finite.slice(Math.max(1, Math.ceil((finite.length - 1) / 4))) : finite;
}

/** One colour per recipe, in the order the race runs them. */
export const RECIPE_COLORS = ['#1f4e8c', '#e76f51', '#2a9d8f', '#8e44ad', '#b5651d', '#c0392b', '#6c757d', '#2e7d32'];
const TARGET = '#2e7d32';

/**
 * A race: every recipe's validation curve (the mean over its seeds at each evaluation) on one
 * chart, against steps or training seconds, with the target as a horizontal line.
 * `update(curves, marks)` takes `[{recipe, points: [{step, seconds, value}]}]` and
 * `{x: 'step' | 'seconds', metric, target}`; the chart is built again when the recipes or the
 * x axis change, and updated in place otherwise.
 */
export function raceChart(container) {
  let plot = null;
  let key = '';
  let marks = {};

  function drawTarget(u) {
    if (!Number.isFinite(marks.target)) return;
    const { ctx, bbox } = u;
    const pos = u.valToPos(marks.target, 'y', true);
    if (!(pos >= bbox.top - 1 && pos <= bbox.top + bbox.height + 1)) return;
    const ratio = pxRatio();
    ctx.save();
    ctx.strokeStyle = TARGET;
    ctx.lineWidth = 1.5 * ratio;
    ctx.setLineDash([6 * ratio, 4 * ratio]);
    ctx.beginPath();
    ctx.moveTo(bbox.left, pos);
    ctx.lineTo(bbox.left + bbox.width, pos);
    ctx.stroke();
    ctx.setLineDash([]);
    ctx.font = `${Math.round(11 * ratio)}px system-ui, sans-serif`;
    // uPlot leaves the alignment of the axis it drew last (right, for the y axis).
    ctx.textAlign = 'left';
    ctx.fillStyle = TARGET;
    ctx.fillText(`target ${fmtValue(marks.target)}`, bbox.left + 6 * ratio, pos - 5 * ratio);
    ctx.restore();
  }

  /**
   * The curves from a quarter of the way on, and the target. The first point is the untrained
   * model, and the first quarter is where every recipe climbs from chance (on MNIST, one was
   * still at 44 % at the second evaluation while all five finished between 94 and 96 %): a
   * range that held them would squeeze the race into a sliver of the chart. Their start runs
   * off the bottom (of an accuracy) or the top (of a loss) instead.
   */
  function yRange(u, min, max) {
    const shown = [];
    for (const values of u.data.slice(1)) shown.push(...settledValues(values));
    let low = shown.length > 0 ? Math.min(...shown) : min;
    let high = shown.length > 0 ? Math.max(...shown) : max;
    if (Number.isFinite(marks.target)) {
      low = Math.min(low, marks.target);
      high = Math.max(high, marks.target);
    }
    if (u.scales.y.distr === 3) return [low / 1.15, high * 1.15];
    const pad = (high - low) * 0.08 || Math.abs(high) * 0.05 || 0.05;
    return [low - pad, high + pad];
  }

  const accuracy = () => marks.metric === 'val_accuracy';
  const fmtValue = (value) => {
    if (!Number.isFinite(value)) return '–';
    return accuracy() ? `${(value * 100).toFixed(2)} %` : fmtLoss(value);
  };
  const lastFinite = (values) => {
    for (let index = values.length - 1; index >= 0; index -= 1) {
      if (Number.isFinite(values[index])) return values[index];
    }
    return null;
  };

  return {
    update(curves, newMarks) {
      if (newMarks) marks = newMarks;
      const drawn = curves.filter((curve) => curve.points.length > 0);
      if (drawn.length === 0) return false;
      const xOf = (point) => (marks.x === 'seconds' ? point.seconds : point.step);
      // One x array for all recipes: each curve has values at its own xs, gaps elsewhere.
      const xs = [...new Set(drawn.flatMap((curve) => curve.points.map(xOf)))].sort((a, b) => a - b);
      const data = [xs];
      for (const curve of drawn) {
        const at = new Map(curve.points.map((point) => [xOf(point), point.value]));
        data.push(xs.map((x) => (at.has(x) && Number.isFinite(at.get(x)) ? at.get(x) : null)));
      }
      // A loss falls by orders of magnitude over a run: a log axis, where every value is above 0.
      const logY = marks.metric !== 'val_accuracy' && data.slice(1).every((values) => values.every((v) => v === null || v > 0));
      const newKey = `${marks.x}|${marks.metric}|${logY}|${drawn.map((curve) => curve.recipe).join(',')}`;
      if (plot && newKey === key) {
        plot.setData(data);
        return true;
      }
      if (plot) plot.destroy();
      key = newKey;
      container.replaceChildren();
      const metricLabel = accuracy() ? 'validation accuracy' : `validation loss${logY ? ' (log scale)' : ''}`;
      plot = new uPlot(
        {
          width: container.clientWidth || 600,
          height: chartHeight(container),
          scales: { x: { time: false }, y: logY ? { distr: 3, log: 10, range: yRange } : { range: yRange } },
          axes: [
            {
              label: marks.x === 'seconds' ? 'training seconds' : 'optimizer step',
              font: AXIS_FONT,
              labelFont: AXIS_FONT,
              values: (u, splits) => splits.map(tick),
            },
            valueAxis(metricLabel, accuracy() ? { values: (u, splits) => splits.map(percentTick) } : {}),
          ],
          // The legend shows every recipe's value at the hovered evaluation, and its last one
          // while the cursor is away (the x cell then reads "last").
          series: [
            {
              label: marks.x === 'seconds' ? 'seconds' : 'step',
              value: (u, v, seriesIndex, index) => (index === null ? 'last' : tick(v)),
            },
            ...drawn.map((curve, index) => ({
              label: curve.recipe,
              stroke: RECIPE_COLORS[index % RECIPE_COLORS.length],
              width: 2,
              spanGaps: true,
              value: (u, v, seriesIndex, at) => fmtValue(at === null ? lastFinite(u.data[seriesIndex]) : v),
            })),
          ],
          hooks: { draw: [drawTarget] },
          legend: { live: true },
          // On the seconds axis every recipe has values at its own xs only: each series takes
          // its nearest evaluation rather than the gap at the hovered x.
          cursor: { drag: { x: false, y: false }, hover: { skip: [null, undefined] } },
        },
        data,
        container,
      );
      // For the browser tests (and a curious reader's console): the scales and the cursor.
      container.uplot = plot;
      followWidth(plot, container);
      return true;
    },
  };
}
