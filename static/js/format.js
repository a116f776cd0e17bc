// Formatting shared by the pages: learning rates as 1.2e-3, losses to four figures, ages,
// and a small helper to build elements without inline HTML.

/** A learning rate (or any positive scale-free number) as `1.2e-3`, or `1.2` between 1 and 10. */
export function lr(value, digits = 2) {
  if (value === null || value === undefined || !Number.isFinite(value)) return '–';
  if (value === 0) return '0';
  return value.toExponential(Math.max(0, digits - 1)).replace('e+', 'e').replace(/e0$/, '');
}

/** An axis tick: plain between 0.01 and 10 000 (`0.75`, `1.25`), else `2.5e-3`. */
export function tick(value) {
  if (!Number.isFinite(value)) return '';
  if (value === 0) return '0';
  const magnitude = Math.abs(value);
  if (magnitude >= 1e-2 && magnitude < 1e4) return String(Number(value.toPrecision(3)));
  return String(Number(value.toPrecision(3)).toExponential()).replace('e+', 'e');
}

/** A loss or accuracy to four significant figures. */
export function loss(value) {
  if (value === null || value === undefined || !Number.isFinite(value)) return '–';
  return Number(value.toPrecision(4)).toString();
}

/**
 * A mean over seeds with its standard deviation, both to the same decimals: the mean's four
 * significant figures, or fewer where the std's second significant figure is coarser (a
 * spread of 0.03 makes a fourth figure noise). `0.1521 ± 0.0001429` reads `0.1521 ± 0.0001`,
 * `0.1521 ± 0.0312` reads `0.152 ± 0.031`; a std that rounds to nothing reads `± <0.0001`,
 * one of exactly 0 (the seeds agreed) `± 0.0000`, and none (`null`: one seed) is left out.
 * `unit` goes after the mean (`98.12 % ± 0.05`).
 */
export function plusMinus(mean, std, unit = '') {
  if (mean === null || mean === undefined || !Number.isFinite(mean)) return '–';
  const decimalsFor = (value, figures) =>
    value === 0 ? Infinity : Math.max(0, figures - 1 - Math.floor(Math.log10(Math.abs(value))));
  const hasSpread = Number.isFinite(std) && std >= 0;
  const decimals = Math.min(decimalsFor(mean, 4), hasSpread ? decimalsFor(std, 2) : Infinity);
  // A mean of 0 with no spread has no decimals; 20 is toFixed's limit in older engines.
  const shown = Number.isFinite(decimals) ? Math.min(decimals, 20) : 0;
  const text = `${mean.toFixed(shown)}${unit}`;
  if (!hasSpread) return text;
  const spread = std.toFixed(shown);
  if (std > 0 && Number(spread) === 0) return `${text} ± <${(10 ** -shown).toFixed(shown)}`;
  return `${text} ± ${spread}`;
}

export function percent(fraction) {
  if (!Number.isFinite(fraction)) return '–';
  return `${Math.round(fraction * 100)} %`;
}

/** Time since an RFC 3339 timestamp: `12 s`, `5 min`, `3 h`, `2 d`. */
export function age(timestamp, now = Date.now()) {
  const then = Date.parse(timestamp);
  if (!Number.isFinite(then)) return '–';
  const seconds = Math.max(0, Math.round((now - then) / 1000));
  if (seconds < 60) return `${seconds} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min`;
  if (seconds < 86400) return `${Math.floor(seconds / 3600)} h`;
  return `${Math.floor(seconds / 86400)} d`;
}

export function seconds(value) {
  if (!Number.isFinite(value)) return '–';
  if (value < 1) return `${Math.round(value * 1000)} ms`;
  if (value < 120) return `${value.toFixed(1)} s`;
  return `${(value / 60).toFixed(1)} min`;
}

/** `el('a', {href: '/', class: 'x'}, 'text', child)`. */
export function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attributes)) {
    if (value === undefined || value === null || value === false) continue;
    if (key === 'class') node.className = value;
    else if (key === 'text') node.textContent = value;
    else node.setAttribute(key, value === true ? '' : String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

/** Shows `message` in an error box (or hides it when empty). */
export function showMessage(box, message) {
  box.textContent = message || '';
  box.hidden = !message;
}

/** An API error as a user reads it: the message and, when named, the field. */
export function describeError(error) {
  if (error && error.field && !String(error.message).includes(error.field)) {
    return `${error.message} (field: ${error.field})`;
  }
  return error && error.message ? error.message : String(error);
}
