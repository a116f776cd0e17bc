// The forms of `/`: a job spec from a preset, its main fields editable and kept in step with
// the full JSON (either side can be edited), and a CSV upload that shows the server's
// validation error (row and column) as it answers.

import { api } from './api.js';
import { describeError, el, showMessage } from './format.js';

const PRESETS = {
  spirals: {
    name: 'spirals-mlp',
    data: { builtin: 'spirals', samples: 2048 },
    model: { arch: 'mlp', hidden: [32, 32] },
    optimizer: { name: 'sgd', momentum: 0.9 },
    batch_size: 64,
    plan: { epochs: 10 },
    range_test: { start_lr: 1e-6, end_lr: 10, steps: 60 },
    sweep: { count: 3, epochs: 1 },
  },
  'mnist-mlp': {
    name: 'mnist-mlp',
    data: { builtin: 'mnist10k' },
    model: { arch: 'mlp', hidden: [128, 128] },
    optimizer: { name: 'sgd', momentum: 0.9 },
    batch_size: 64,
    plan: { epochs: 10 },
    range_test: { start_lr: 1e-6, end_lr: 10, steps: 100 },
    sweep: { count: 5, epochs: 2 },
  },
  'mnist-cnn': {
    name: 'mnist-cnn',
    data: { builtin: 'mnist10k' },
    model: { arch: 'cnn', channels: [16, 32], hidden: 128 },
    optimizer: { name: 'sgd', momentum: 0.9 },
    batch_size: 64,
    plan: { epochs: 10 },
    range_test: { start_lr: 1e-6, end_lr: 10, steps: 100 },
    sweep: { count: 3, epochs: 1 },
  },
  csv: {
    name: 'csv-mlp',
    data: { dataset_id: '' },
    model: { arch: 'mlp', hidden: [64, 64] },
    optimizer: { name: 'sgd', momentum: 0.9 },
    batch_size: 32,
    plan: { epochs: 20 },
    range_test: { start_lr: 1e-6, end_lr: 10, steps: 100 },
    sweep: { count: 4, epochs: 2 },
  },
};

function getPath(object, path) {
  return path.split('.').reduce((value, key) => (value == null ? undefined : value[key]), object);
}

function setPath(object, path, value) {
  const keys = path.split('.');
  let node = object;
  for (const key of keys.slice(0, -1)) {
    if (typeof node[key] !== 'object' || node[key] === null) node[key] = {};
    node = node[key];
  }
  const last = keys[keys.length - 1];
  if (value === undefined) delete node[last];
  else node[last] = value;
}

function fieldValue(input) {
  const text = input.value.trim();
  if (text === '') return undefined;
  if (input.dataset.type === 'number') {
    const number = Number(text);
    return Number.isFinite(number) ? number : text;
  }
  return text;
}

/** Small learning rates as 1e-6 rather than 0.000001. */
function display(value) {
  if (typeof value === 'number' && value !== 0 && Math.abs(value) < 1e-3) {
    return value.toExponential().replace('e+', 'e');
  }
  return String(value);
}

export function setUpForms({ onSubmitted }) {
  const form = document.getElementById('submit-form');
  const preset = document.getElementById('preset');
  const fields = [...form.querySelectorAll('[data-path]')];
  const json = document.getElementById('spec-json');
  const jsonNote = document.getElementById('spec-json-note');
  const datasetField = document.getElementById('dataset-field');
  const datasetSelect = document.getElementById('f-dataset');
  const submitError = document.getElementById('submit-error');
  const submitOk = document.getElementById('submit-ok');
  const submitButton = document.getElementById('submit-button');
  const jsonHint = jsonNote.textContent;

  let spec = structuredClone(PRESETS[preset.value]);

  function writeJson() {
    json.value = JSON.stringify(spec, null, 2);
  }

  function fillFields() {
    for (const input of fields) {
      const value = getPath(spec, input.dataset.path);
      if (input.tagName === 'SELECT' && value === undefined) input.selectedIndex = 0;
      else input.value = value === undefined ? '' : display(value);
    }
    datasetField.hidden = !('dataset_id' in (spec.data || {}));
  }

  function clearMarks() {
    for (const input of fields) input.classList.remove('invalid');
    json.classList.remove('invalid');
  }

  async function loadDatasets(selected) {
    try {
      const { datasets } = await api.datasets();
      const tabular = datasets.filter((dataset) => dataset.format === 'csv');
      datasetSelect.replaceChildren(
        ...tabular.map((dataset) =>
          el(
            'option',
            { value: dataset.id },
            `${dataset.name || dataset.id} (${dataset.rows} rows, ${dataset.task})`,
          ),
        ),
      );
      if (tabular.length === 0) {
        datasetSelect.append(el('option', { value: '' }, 'no CSV uploaded yet'));
      }
      if (selected) datasetSelect.value = selected;
    } catch (error) {
      showMessage(submitError, `Could not list the datasets: ${describeError(error)}`);
    }
  }

  function applyPreset() {
    spec = structuredClone(PRESETS[preset.value]);
    if (preset.value === 'csv') spec.data.dataset_id = datasetSelect.value;
    clearMarks();
    fillFields();
    writeJson();
  }

  preset.addEventListener('change', applyPreset);

  for (const input of fields) {
    input.addEventListener(input.tagName === 'SELECT' ? 'change' : 'input', () => {
      if (input.dataset.path === 'optimizer.name') {
        // Each optimizer has fields of its own (SGD's momentum is not Adam's): a new one
        // starts from its defaults rather than inheriting fields it would refuse.
        const name = fieldValue(input);
        spec.optimizer = name === 'sgd' ? { name, momentum: 0.9 } : { name };
      }
      setPath(spec, input.dataset.path, fieldValue(input));
      input.classList.remove('invalid');
      writeJson();
    });
  }

  json.addEventListener('input', () => {
    try {
      const parsed = JSON.parse(json.value);
      if (typeof parsed !== 'object' || parsed === null || Array.isArray(parsed)) {
        throw new Error('the spec is a JSON object');
      }
      spec = parsed;
      fillFields();
      json.classList.remove('invalid');
      jsonNote.textContent = jsonHint;
    } catch (error) {
      json.classList.add('invalid');
      jsonNote.textContent = `Not valid JSON yet: ${error.message}`;
    }
  });

  form.addEventListener('submit', async (event) => {
    event.preventDefault();
    clearMarks();
    showMessage(submitError, '');
    showMessage(submitOk, '');
    let body;
    try {
      body = JSON.parse(json.value);
    } catch (error) {
      json.classList.add('invalid');
      document.getElementById('spec-details').open = true;
      showMessage(submitError, `The spec is not valid JSON: ${error.message}`);
      return;
    }
    submitButton.disabled = true;
    try {
      const job = await api.submit(body);
      submitOk.replaceChildren(
        'Queued ',
        el('a', { href: `/jobs/${encodeURIComponent(job.id)}` }, job.name || job.id),
        '.',
      );
      submitOk.hidden = false;
      onSubmitted(job);
    } catch (error) {
      showMessage(submitError, describeError(error));
      const input = fields.find((candidate) => candidate.dataset.path === error.field);
      if (input) input.classList.add('invalid');
      else if (error.field) {
        document.getElementById('spec-details').open = true;
        json.classList.add('invalid');
      }
    } finally {
      submitButton.disabled = false;
    }
  });

  // Upload.
  const upload = document.getElementById('upload-form');
  const fileInput = document.getElementById('u-file');
  const nameInput = document.getElementById('u-name');
  const uploadError = document.getElementById('upload-error');
  const uploadOk = document.getElementById('upload-ok');
  const uploadButton = document.getElementById('upload-button');

  upload.addEventListener('submit', async (event) => {
    event.preventDefault();
    showMessage(uploadError, '');
    showMessage(uploadOk, '');
    const file = fileInput.files[0];
    if (!file) {
      showMessage(uploadError, 'Choose a CSV file first.');
      return;
    }
    const query = {
      name: nameInput.value.trim() || file.name.replace(/\.csv$/i, ''),
      task: document.getElementById('u-task').value,
    };
    const target = document.getElementById('u-target').value.trim();
    if (target) query.target = target;
    uploadButton.disabled = true;
    uploadButton.textContent = 'Checking…';
    try {
      const dataset = await api.uploadCsv(file, query);
      const classes = dataset.classes ? `, ${dataset.classes} classes` : '';
      showMessage(
        uploadOk,
        `Stored ${dataset.id}: ${dataset.rows} rows, ${dataset.features} features${classes} (${dataset.task}). ` +
          'The "Uploaded CSV dataset" preset now uses it.',
      );
      await loadDatasets(dataset.id);
      preset.value = 'csv';
      applyPreset();
    } catch (error) {
      // CSV errors name the row and column in the message; `field` is the column.
      const column = error.field && error.field !== 'csv' ? ` (column ${error.field})` : '';
      const message = error.message.includes(`"${error.field}"`) ? error.message : `${error.message}${column}`;
      showMessage(uploadError, `Refused: ${message}`);
    } finally {
      uploadButton.disabled = false;
      uploadButton.textContent = 'Upload';
    }
  });

  fillFields();
  writeJson();
  loadDatasets(null);
}
