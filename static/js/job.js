// One job at `/jobs/{id}` (the id comes from the location): status, progress and cancel; the
// range-test curve, the sweep and the recommended schedule; the recommendation with its
// snippets and warnings. A `compare` job shows its race instead: every recipe's validation
// curve, the target, the table of recipes and the verdict. While the job runs it follows the event stream, and polls if the
// stream cannot be read.

import { api, readEvents } from './api.js';
import { RECIPE_COLORS, SUGGESTION_STYLE, raceChart, rangeChart, scheduleChart, sweepChart } from './charts.js';
import { age, describeError, el, loss, lr, percent, plusMinus, seconds, showMessage } from './format.js';

const ACTIVE = new Set(['queued', 'running']);
const id = decodeURIComponent(location.pathname.split('/').filter(Boolean)[1] || '');

const $ = (name) => document.getElementById(name);
const pageError = $('page-error');
const cancelButton = $('cancel-button');

const range = rangeChart($('range-chart'));
const sweep = sweepChart($('sweep-chart'));
const race = raceChart($('race-chart'));

const state = {
  job: null,
  points: [],
  sweepRuns: [],
  racePoints: [],
  raceSeen: new Set(),
  raceX: 'step',
  // The chart's y: the target's metric unless the reader picks the other one.
  raceY: null,
  scheduleShown: false,
  // By index; side by side, a later trial may be heard of before an earlier one.
  trials: [],
};

function isRace(job) {
  return Boolean(job) && job.kind === 'compare';
}

function setRacePoints(points) {
  state.racePoints = points.slice();
  state.raceSeen = new Set(points.map(racePointKey));
}

function racePointKey(point) {
  return `${point.recipe}|${point.seed}|${point.step}`;
}

function resultOf(job) {
  return job && job.result ? job.result : null;
}

function renderHead(job) {
  document.title = `lrtune: ${job.name || job.id}`;
  $('job-name').textContent = job.name || job.id;
  $('job-id').textContent = job.id;
  const status = $('job-status');
  status.textContent = job.status;
  status.className = `status status-${job.status}`;
  const parts = [`${job.kind.replace('_', ' ')}`, `created ${age(job.created_at)} ago`];
  const result = resultOf(job);
  if (result && result.timing) {
    const steps = isRace(job)
      ? result.timing.tune_steps + result.timing.race_steps
      : result.timing.total_steps;
    parts.push(`${seconds(result.timing.seconds)} for ${steps} steps`);
  }
  if (result && result.model) parts.push(`${result.model.arch}, ${result.model.parameters} parameters`);
  if (result && result.data) parts.push(`${result.data.rows} training rows, ${result.data.task}`);
  $('job-meta').textContent = `· ${parts.join(' · ')}`;
  renderProgress(job.progress, job.status);
  cancelButton.hidden = !ACTIVE.has(job.status) || job.cancel_requested;
  const failure = job.error ? `Failed: ${describeError(job.error)}` : '';
  showMessage($('job-error'), failure);
  $('job-spec').textContent = JSON.stringify(job.spec, null, 2);
}

function renderProgress(progress, status) {
  const fraction = progress.total > 0 ? progress.done / progress.total : status === 'succeeded' ? 1 : 0;
  $('job-progress').value = fraction;
  let text = `${percent(fraction)}`;
  if (ACTIVE.has(status)) {
    if (progress.total > 0) text += ` · step ${progress.done} of ${progress.total}`;
    if (progress.stage) text += ` · ${progress.stage.replace('_', ' ')}`;
  } else if (progress.total > 0) {
    text += ` · ${progress.done} of ${progress.total} steps`;
  }
  $('job-progress-text').textContent = text;
}

function marks(job) {
  const tested = job.spec && job.spec.range_test;
  const xRange =
    tested && tested.start_lr > 0 && tested.end_lr > tested.start_lr ? [tested.start_lr, tested.end_lr] : null;
  const result = resultOf(job);
  if (!result) return { xRange };
  const recommendation = result.recommendation || {};
  return {
    xRange,
    suggestions: result.range_test ? result.range_test.suggestions : null,
    stoppedEarly: result.range_test ? result.range_test.stopped_early : false,
    band: recommendation.band || null,
    peak: recommendation.peak_lr,
  };
}

function renderRange() {
  const drawn = range.update(state.points, marks(state.job));
  $('range-empty').hidden = drawn;
  const result = resultOf(state.job);
  const suggestions = result && result.range_test ? result.range_test.suggestions : null;
  $('suggestions').hidden = !suggestions;
  if (!suggestions) return;
  const rows = Object.entries(SUGGESTION_STYLE).map(([name, style]) => {
    const swatch = el('span', { class: `swatch swatch-${name}` });
    return el(
      'tr',
      { 'data-suggestion': name },
      el('td', {}, swatch, name),
      el('td', { class: 'num' }, lr(suggestions[name])),
      el('td', { class: 'muted small' }, style.rule),
    );
  });
  const rt = result.range_test;
  const early = rt.stopped_early
    ? `stopped early after ${rt.steps_run} steps: the loss diverged (marked on the curve)`
    : `ran all ${rt.steps_run} steps without diverging`;
  rows.push(el('tr', {}, el('td', { colspan: 3, class: 'muted small' }, `The range test ${early}.`)));
  $('suggestions-body').replaceChildren(...rows);
}

/** Sweep candidates: from the result when finished, else the runs so far (mean over seeds). */
function sweepCandidates() {
  const result = resultOf(state.job);
  if (result && Array.isArray(result.sweep)) return result.sweep;
  // A candidate is a peak at a horizon: the same peak may be screened short, then run long.
  const byRun = new Map();
  for (const run of state.sweepRuns) {
    const key = `${run.steps}:${run.peak_lr}`;
    const entry = byRun.get(key) || { peak_lr: run.peak_lr, steps: run.steps, losses: [] };
    if (Number.isFinite(run.val_loss) && !run.diverged) entry.losses.push(run.val_loss);
    byRun.set(key, entry);
  }
  return [...byRun.values()].map((entry) => ({
    peak_lr: entry.peak_lr,
    steps: entry.steps,
    val_loss: entry.losses.length ? entry.losses.reduce((a, b) => a + b, 0) / entry.losses.length : null,
  }));
}

function renderSweep() {
  const result = resultOf(state.job);
  const running = state.trials.filter((t) => t && t.kind === 'sweep' && t.status === 'running');
  const sweepMarks = result && result.recommendation
    ? {
        band: result.recommendation.band,
        peak: result.recommendation.peak_lr,
        edge: result.recommendation.stability_edge_lr,
      }
    : {};
  sweepMarks.running = running.map((t) => t.lr);
  const candidates = sweepCandidates();
  const drawn = sweep.update(candidates, sweepMarks);
  const note = $('sweep-running');
  note.hidden = running.length === 0;
  note.textContent = `Training now (dotted): ${running
    .map((t) => `${lr(t.lr)} (seed ${t.seed}, ${t.steps} steps) on ${t.worker || 'a worker'}`)
    .join(', ')}.`;
  renderHorizon(result, candidates);
  const diverged = candidates.filter((c) => c.diverged || !Number.isFinite(c.val_loss));
  const empty = $('sweep-empty');
  if (diverged.length > 0) {
    empty.textContent = `Diverged (not plotted): ${diverged.map((c) => lr(c.peak_lr)).join(', ')}.`;
    empty.hidden = false;
  } else {
    empty.textContent = state.job && state.job.kind === 'range_test' ? 'A range_test job has no sweep.' : 'No sweep runs yet.';
    empty.hidden = drawn;
  }
  renderEdge(result, candidates);
}

/** The stability edge under the sweep chart, with the unstable candidates that finished. */
function renderEdge(result, candidates) {
  const note = $('sweep-unstable');
  const recommendation = result && result.recommendation;
  const edge = recommendation && recommendation.stability_edge_lr;
  if (!Number.isFinite(edge)) {
    note.hidden = true;
    return;
  }
  const reason = String(recommendation.stability_edge_reason || '').replace(/_/g, ' ');
  const unstable = [...new Set(candidates
    .filter((c) => c.unstable && Number.isFinite(c.val_loss))
    .map((c) => c.peak_lr))].sort((a, b) => a - b);
  let text = `Stability edge ${lr(edge)} (${reason}, dashed): the peaks at or above it are unstable, and the recommendation keeps a margin below it.`;
  if (unstable.length > 0) text += ` Unstable, finished (orange): ${unstable.map((peak) => lr(peak)).join(', ')}.`;
  note.textContent = text;
  note.hidden = false;
}

/** Which horizon the winner was judged at, and the screening that came first. */
function renderHorizon(result, candidates) {
  const note = $('sweep-horizon');
  const recommendation = result && result.recommendation;
  const epochs = recommendation && recommendation.judged_at_epochs;
  if (!Number.isFinite(epochs)) {
    note.hidden = true;
    return;
  }
  const planned = state.job.spec.plan.epochs;
  const short = epochs < planned - 1e-9;
  let text = `Judged after ${round(epochs)} epochs${short ? `, shorter than the planned ${planned} (the budget allowed no more)` : ' (the planned run)'}.`;
  const screened = candidates.filter((c) => c.steps && c.steps < recommendation.judged_at_steps);
  if (screened.length > 0) {
    const screenEpochs = epochs * (screened[0].steps / recommendation.judged_at_steps);
    text += ` ${screened.length} candidates were screened first at ${round(screenEpochs)} epochs (dashed).`;
  }
  note.textContent = text;
  note.hidden = false;
}

function round(value) {
  return Math.abs(value - Math.round(value)) < 0.05 ? String(Math.round(value)) : value.toFixed(1);
}

async function renderRecommendation() {
  const result = resultOf(state.job);
  const recommendation = result && result.recommendation;
  $('recommendation').hidden = !recommendation;
  if (!recommendation) return;
  $('rec-peak').textContent = lr(recommendation.peak_lr, 3);
  $('rec-peak').dataset.peakLr = String(recommendation.peak_lr);
  $('rec-band').textContent = recommendation.band
    ? `${lr(recommendation.band[0])} to ${lr(recommendation.band[1])}`
    : '–';
  $('rec-source').textContent = recommendation.source === 'sweep' ? 'sweep' : 'range test';
  const edge = recommendation.stability_edge_lr;
  $('rec-edge').hidden = !Number.isFinite(edge);
  $('rec-edge').textContent = Number.isFinite(edge)
    ? `stability edge ${lr(edge)} (${String(recommendation.stability_edge_reason || '').replace(/_/g, ' ')}): the peak is ${recommendation.edge_distance.toFixed(1)}x below it`
    : '';
  $('rec-pytorch').textContent = recommendation.pytorch || '';
  $('rec-fastai').textContent = recommendation.fastai || '';
  const warnings = recommendation.warnings || [];
  $('rec-warnings').replaceChildren(...warnings.map((text) => el('li', {}, text)));
  $('rec-warnings').hidden = warnings.length === 0;

  if (state.scheduleShown || !recommendation.schedule) return;
  state.scheduleShown = true;
  try {
    const curve = await api.schedule(recommendation.schedule);
    scheduleChart($('schedule-chart'), curve);
    const schedule = recommendation.schedule;
    const peak = Number.isFinite(schedule.max_lr) ? `, peak ${lr(schedule.max_lr, 3)}` : '';
    $('schedule-empty').textContent =
      `${schedule.kind.replace('_', ' ')} over the planned ${curve.lr.length} steps${peak}. ` +
      (Array.isArray(curve.momentum) && curve.momentum.some(Number.isFinite)
        ? 'Learning rate on the left axis, momentum (dashed) on the right.'
        : 'Learning rate per optimizer step.');
  } catch (error) {
    state.scheduleShown = false;
    $('schedule-empty').textContent = `Could not compute the schedule: ${describeError(error)}`;
  }
}

/** The recipes in the order they race: the result's, else the order their points came in. */
function raceRecipes() {
  const result = resultOf(state.job);
  const names = result && Array.isArray(result.recipes) ? result.recipes.map((r) => r.name) : [];
  for (const point of state.racePoints) {
    if (!names.includes(point.recipe)) names.push(point.recipe);
  }
  return names;
}

function hasAccuracy() {
  return state.racePoints.some((point) => Number.isFinite(point.val_accuracy));
}

/** The target's metric (accuracy for a classifier), or the one the reader picked. */
function raceMetric() {
  if (state.raceY === 'val_loss' || (state.raceY === 'val_accuracy' && hasAccuracy())) return state.raceY;
  const result = resultOf(state.job);
  if (result && result.target) return result.target.metric;
  return hasAccuracy() ? 'val_accuracy' : 'val_loss';
}

/** Each recipe's curve: the mean over its seeds at each evaluation step. */
function raceCurves(metric) {
  return raceRecipes().map((recipe) => {
    const bySteps = new Map();
    for (const point of state.racePoints) {
      if (point.recipe !== recipe) continue;
      const entry = bySteps.get(point.step) || { step: point.step, seconds: [], values: [] };
      entry.seconds.push(point.seconds);
      if (Number.isFinite(point[metric])) entry.values.push(point[metric]);
      bySteps.set(point.step, entry);
    }
    const mean = (values) => values.reduce((a, b) => a + b, 0) / values.length;
    const points = [...bySteps.values()]
      .sort((a, b) => a.step - b.step)
      .map((entry) => ({
        step: entry.step,
        seconds: mean(entry.seconds),
        value: entry.values.length ? mean(entry.values) : null,
      }));
    return { recipe, points };
  });
}

/** A final metric over the seeds; with one seed there is no spread to show. */
function metricText(stat, accuracy, seeds) {
  if (!stat || !Number.isFinite(stat.mean)) return stat ? 'diverged' : '–';
  const std = seeds > 1 && Number.isFinite(stat.std) ? stat.std : null;
  if (accuracy) return plusMinus(stat.mean * 100, std === null ? null : std * 100, ' %');
  return plusMinus(stat.mean, std);
}

/** How a recipe's learning rate was found: `2,400 steps` of tuning, or `untuned`. */
function tuningText(recipe) {
  if (recipe.tuned === false) return 'untuned';
  if (Number.isFinite(recipe.tune_steps)) return `${recipe.tune_steps.toLocaleString('en-US')} steps`;
  return recipe.tuned === true ? 'tuned' : '–';
}

/**
 * The race table's columns: a header, a class for its cells and the cell's text. "Tuning" is
 * shown only when the result says how each recipe was tuned (older results do not).
 */
function raceColumns(recipes, seeds) {
  const columns = [
    { label: '#', class: 'num rank', text: (recipe, rank) => String(rank + 1) },
    { label: 'Recipe', class: 'recipe', text: null },
    { label: 'Optimizer', class: 'optimizer', text: (recipe) => recipe.optimizer },
    { label: 'Schedule', class: 'schedule', text: (recipe) => recipe.schedule.replaceAll('_', ' ') },
    // Prodigy's learning rate is a multiplier of the step size d it estimates: show both,
    // on two lines.
    {
      label: 'Learning rate',
      class: 'num lr',
      text: (recipe) =>
        recipe.final_d && Number.isFinite(recipe.final_d.mean)
          ? `${lr(recipe.lr, 3)}\n(d ${lr(recipe.final_d.mean, 3)})`
          : lr(recipe.lr, 3),
    },
    {
      label: 'Tuning',
      class: 'num tuning',
      text: tuningText,
      shown: recipes.some((recipe) => 'tuned' in recipe || 'tune_steps' in recipe),
    },
    { label: 'Final val loss', class: 'num final-loss', text: (recipe) => metricText(recipe.final_val_loss, false, seeds) },
    {
      label: 'Final val accuracy',
      class: 'num final-accuracy',
      text: (recipe) => (recipe.final_val_accuracy ? metricText(recipe.final_val_accuracy, true, seeds) : '–'),
    },
    {
      label: 'Steps to target',
      class: 'num steps-to-target',
      text: (recipe) => (Number.isFinite(recipe.steps_to_target) ? String(recipe.steps_to_target) : 'never'),
    },
    {
      label: 'Seconds to target',
      class: 'num seconds-to-target',
      text: (recipe) => (Number.isFinite(recipe.seconds_to_target) ? seconds(recipe.seconds_to_target) : 'never'),
    },
  ];
  return columns.filter((column) => column.shown !== false);
}

function renderRace() {
  const result = resultOf(state.job);
  const metric = raceMetric();
  const target = result && result.target ? result.target : null;
  const drawn = race.update(raceCurves(metric), {
    x: state.raceX,
    metric,
    target: target && target.metric === metric && Number.isFinite(target.value) ? target.value : null,
  });
  $('race-empty').hidden = drawn;
  for (const axis of ['step', 'seconds']) {
    $(`race-x-${axis}`).setAttribute('aria-pressed', String(state.raceX === axis));
  }
  // A regression race has only the loss to show.
  $('race-y').hidden = !hasAccuracy();
  for (const y of ['val_accuracy', 'val_loss']) {
    $(`race-y-${y}`).setAttribute('aria-pressed', String(metric === y));
  }
  const verdict = result && typeof result.verdict === 'string' ? result.verdict : '';
  $('race-verdict').textContent = verdict;
  $('race-verdict').hidden = !verdict;
  const targetNote = $('race-target');
  if (target && Number.isFinite(target.value)) {
    const accuracy = target.metric === 'val_accuracy';
    const value = accuracy ? `${(target.value * 100).toFixed(2)} %` : loss(target.value);
    targetNote.textContent =
      `Target: ${target.metric} ${accuracy ? '≥' : '≤'} ${value}` +
      (target.of_recipe ? ` (${Math.round(target.fraction * 100)} % of ${target.of_recipe}'s final).` : '.');
    targetNote.hidden = false;
  } else {
    targetNote.hidden = true;
  }
  const recipes = result && Array.isArray(result.recipes) ? result.recipes : [];
  $('race-table').hidden = recipes.length === 0;
  if (recipes.length === 0) return;
  const order = raceRecipes();
  const ranking = Array.isArray(result.ranking) ? result.ranking : order;
  const ranked = ranking.map((name) => recipes.find((recipe) => recipe.name === name)).filter(Boolean);
  const columns = raceColumns(ranked, result.seeds);
  $('race-head-row').replaceChildren(
    ...columns.map((column) => el('th', { class: column.class, scope: 'col' }, column.label)),
  );
  const rows = ranked.map((recipe, rank) => {
    const color = RECIPE_COLORS[order.indexOf(recipe.name) % RECIPE_COLORS.length];
    const cells = columns.map((column) => {
      if (column.text) return el('td', { class: column.class }, column.text(recipe, rank));
      const swatch = el('span', { class: 'swatch' });
      // Through the CSSOM: the page's policy refuses inline style attributes.
      swatch.style.background = color;
      return el('td', { class: column.class }, swatch, recipe.name);
    });
    return el('tr', { 'data-recipe': recipe.name }, ...cells);
  });
  $('race-body').replaceChildren(...rows);
}

const TRIAL_KINDS = { range_test: 'range test', sweep: 'sweep run', race: 'race run' };

function trialSteps(trial) {
  if (trial.steps_run == null || trial.steps_run === trial.steps) return String(trial.steps);
  return `${trial.steps_run} of ${trial.steps}`;
}

function trialOutcome(trial) {
  if (trial.diverged_at != null && trial.kind !== 'range_test') return `diverged at step ${trial.diverged_at}`;
  return trial.val_loss == null ? '–' : loss(trial.val_loss);
}

function renderTrials() {
  const trials = state.trials.filter(Boolean);
  $('trials').hidden = trials.length === 0;
  const counts = {};
  for (const trial of trials) counts[trial.status] = (counts[trial.status] || 0) + 1;
  const workers = new Set(trials.filter((t) => t.status === 'running').map((t) => t.worker));
  const running = counts.running ? ` · ${counts.running} running on ${workers.size} worker${workers.size === 1 ? '' : 's'}` : '';
  $('trials-summary').textContent = trials.length === 0
    ? 'No trial has started yet.'
    : `${trials.length} trial${trials.length === 1 ? '' : 's'}: ${counts.succeeded || 0} done${running}` +
      (counts.failed ? ` · ${counts.failed} failed` : '') + (counts.canceled ? ` · ${counts.canceled} canceled` : '');
  const rows = trials.map((trial) => el('tr', { 'data-status': trial.status },
    el('td', { class: 'num' }, String(trial.index)),
    el('td', {}, TRIAL_KINDS[trial.kind] || trial.kind),
    el('td', { class: 'num' }, trial.lr == null ? '–' : lr(trial.lr)),
    el('td', {}, trial.recipe || '–'),
    el('td', { class: 'num' }, String(trial.seed)),
    el('td', { class: 'num' }, trialSteps(trial)),
    el('td', {}, el('span', { class: `status status-${trial.status}` }, trial.status)),
    el('td', {}, trial.worker || '–'),
    el('td', { class: 'num' }, trial.seconds == null ? '–' : seconds(trial.seconds)),
    el('td', { class: 'num' }, trialOutcome(trial)),
  ));
  $('trials-body').replaceChildren(...rows);
}

function setTrials(trials) {
  state.trials = [];
  for (const trial of trials) state.trials[trial.index] = trial;
}

function renderAll() {
  renderHead(state.job);
  renderTrials();
  const racing = isRace(state.job);
  $('race').hidden = !racing;
  for (const section of document.querySelectorAll('.tune-only')) section.hidden = racing;
  if (racing) {
    renderRace();
    return Promise.resolve();
  }
  renderRange();
  renderSweep();
  return renderRecommendation();
}

async function loadAll() {
  const [job, curve, trials] = await Promise.all([api.job(id), api.curve(id), api.trials(id)]);
  state.job = job;
  setTrials(trials.trials);
  state.points = curve.points;
  state.sweepRuns = curve.sweep_runs;
  setRacePoints(curve.race_points || []);
  await renderAll();
}

// Live updates: events are applied as they come and drawn at most once a frame.
let frame = 0;
function redrawSoon() {
  if (frame) return;
  frame = requestAnimationFrame(() => {
    frame = 0;
    if (isRace(state.job)) {
      renderRace();
      return;
    }
    renderRange();
    renderSweep();
  });
}

function onEvent(name, data) {
  if (name === 'point') {
    const last = state.points[state.points.length - 1];
    if (!last || data.step > last.step) state.points.push(data);
    redrawSoon();
  } else if (name === 'sweep_run') {
    const known = state.sweepRuns.some((run) => run.peak_lr === data.peak_lr && run.seed === data.seed);
    if (!known) state.sweepRuns.push(data);
    redrawSoon();
  } else if (name === 'race_point') {
    const key = racePointKey(data);
    if (!state.raceSeen.has(key)) {
      state.raceSeen.add(key);
      state.racePoints.push(data);
    }
    redrawSoon();
  } else if (name === 'trial') {
    state.trials[data.index] = data;
    renderTrials();
    redrawSoon();
  } else if (name === 'progress') {
    state.job.progress = { ...state.job.progress, ...data };
    renderProgress(state.job.progress, state.job.status);
  } else if (name === 'status') {
    state.job.status = data.status;
    if (data.error) state.job.error = data.error;
    renderHead(state.job);
  }
}

/**
 * One connection to the event stream. Points written between the page's first read of the
 * curve and the subscription would be missed, so once the stream is open the curve is read
 * again and the events that came meanwhile are applied on top (repeats are dropped).
 */
async function streamOnce() {
  let synced = false;
  let resync = null;
  const early = [];
  await readEvents(id, (name, data) => {
    if (synced) {
      onEvent(name, data);
      return;
    }
    early.push([name, data]);
    resync ??= api
      .curve(id)
      .then((curve) => {
        state.points = curve.points;
        state.sweepRuns = curve.sweep_runs;
        setRacePoints(curve.race_points || []);
      })
      .catch(() => {
        // Keep what the page has: the reload when the stream ends fills any gap.
      })
      .finally(() => {
        synced = true;
        for (const [earlyName, earlyData] of early.splice(0)) onEvent(earlyName, earlyData);
        redrawSoon();
      });
  });
  if (resync) await resync;
}

async function follow() {
  let failures = 0;
  while (ACTIVE.has(state.job.status)) {
    try {
      await streamOnce();
      failures = 0;
    } catch (error) {
      failures += 1;
      if (failures >= 3) showMessage(pageError, `Live updates interrupted (${describeError(error)}): polling.`);
    }
    // The stream ended (the job finished, or the connection dropped): reload everything so
    // nothing sent while reconnecting is missed, and go on while the job still runs.
    await new Promise((resolve) => setTimeout(resolve, failures > 0 ? 2000 : 0));
    try {
      await loadAll();
    } catch (error) {
      showMessage(pageError, `Could not reload the job: ${describeError(error)}`);
      await new Promise((resolve) => setTimeout(resolve, 2000));
    }
  }
}

for (const axis of ['step', 'seconds']) {
  $(`race-x-${axis}`).addEventListener('click', () => {
    state.raceX = axis;
    if (state.job) renderRace();
  });
}

for (const y of ['val_accuracy', 'val_loss']) {
  $(`race-y-${y}`).addEventListener('click', () => {
    state.raceY = y;
    if (state.job) renderRace();
  });
}

cancelButton.addEventListener('click', async () => {
  cancelButton.disabled = true;
  try {
    state.job = await api.cancel(id);
    renderHead(state.job);
  } catch (error) {
    showMessage(pageError, `Could not cancel: ${describeError(error)}`);
  } finally {
    cancelButton.disabled = false;
  }
});

for (const button of document.querySelectorAll('button.copy')) {
  button.addEventListener('click', async () => {
    const text = $(button.dataset.copy).textContent;
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = 'Copied';
    } catch {
      // No clipboard permission (an insecure origin): select the text for a manual copy.
      const range = document.createRange();
      range.selectNodeContents($(button.dataset.copy));
      const selection = getSelection();
      selection.removeAllRanges();
      selection.addRange(range);
      button.textContent = 'Selected: press Ctrl+C';
    }
    setTimeout(() => {
      button.textContent = 'Copy';
    }, 2000);
  });
}

async function main() {
  if (!id) {
    showMessage(pageError, 'No job id in the address.');
    return;
  }
  $('job-id').textContent = id;
  try {
    await loadAll();
  } catch (error) {
    showMessage(pageError, error.status === 404 ? `There is no job ${id}.` : `Could not load the job: ${describeError(error)}`);
    return;
  }
  await follow();
  document.body.dataset.loaded = 'true';
}

main();
