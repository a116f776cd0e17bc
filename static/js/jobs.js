// The job list at `/`: newest first, polled every two seconds while a job is queued or
// running (every ten otherwise), plus the submit and upload forms (submit.js).

import { api } from './api.js';
import { age, describeError, el, lr, percent, showMessage } from './format.js';
import { setUpForms } from './submit.js';

const ACTIVE = new Set(['queued', 'running']);
const PAGE = 50;

const body = document.getElementById('jobs-body');
const empty = document.getElementById('jobs-empty');
const errorBox = document.getElementById('jobs-error');
const updated = document.getElementById('jobs-updated');
const more = document.getElementById('jobs-more');

let olderPages = [];
let olderCursor = null;
let timer = null;

function progressCell(job) {
  const { done, total, fraction, stage } = job.progress;
  const bar = el('progress', { max: 1, value: fraction, 'aria-label': 'progress' });
  let text = percent(fraction);
  if (job.status === 'running' && total > 0) text = `${done}/${total}${stage ? ` ${stage.replace('_', ' ')}` : ''}`;
  return el('td', { class: 'progress-cell' }, bar, el('span', { class: 'small' }, text));
}

function row(job) {
  const peak = job.result && job.result.recommendation ? job.result.recommendation.peak_lr : null;
  const link = el('a', { href: `/jobs/${encodeURIComponent(job.id)}` }, job.name || job.id);
  const nameCell = el('td', { class: 'name-cell' }, link);
  if (job.name) nameCell.append(el('div', { class: 'muted small' }, job.id));
  return el(
    'tr',
    { 'data-job-id': job.id, 'data-status': job.status },
    nameCell,
    el('td', { class: 'col-kind' }, job.kind),
    el('td', {}, el('span', { class: `status status-${job.status}` }, job.status)),
    progressCell(job),
    el('td', { class: 'num peak-lr' }, lr(peak)),
    el('td', { class: 'col-age num', title: job.created_at }, age(job.created_at)),
  );
}

function render(jobs) {
  body.replaceChildren(...jobs.map(row));
  empty.hidden = jobs.length > 0;
  updated.textContent = `updated ${new Date().toLocaleTimeString()}`;
}

async function refresh() {
  clearTimeout(timer);
  let active = false;
  try {
    const first = await api.jobs(`?limit=${PAGE}`);
    const jobs = first.jobs.concat(...olderPages);
    // Older pages were fetched before newer jobs pushed their rows down: drop repeats.
    const seen = new Set();
    const unique = jobs.filter((job) => !seen.has(job.id) && seen.add(job.id));
    render(unique);
    if (olderPages.length === 0) olderCursor = first.next_cursor;
    more.hidden = !olderCursor;
    active = unique.some((job) => ACTIVE.has(job.status));
    showMessage(errorBox, '');
  } catch (error) {
    showMessage(errorBox, `Could not load the jobs: ${describeError(error)}`);
  }
  timer = setTimeout(refresh, active ? 2000 : 10000);
}

more.addEventListener('click', async () => {
  if (!olderCursor) return;
  try {
    const page = await api.jobs(`?limit=${PAGE}&cursor=${encodeURIComponent(olderCursor)}`);
    olderPages.push(page.jobs);
    olderCursor = page.next_cursor;
    await refresh();
  } catch (error) {
    showMessage(errorBox, `Could not load older jobs: ${describeError(error)}`);
  }
});

document.addEventListener('visibilitychange', () => {
  if (!document.hidden) refresh();
});

setUpForms({ onSubmitted: refresh });
refresh();
