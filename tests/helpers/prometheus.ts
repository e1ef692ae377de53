/**
 * Scraping `/metrics` in tests, with a parser that refuses what Prometheus would: the
 * text exposition format, checked line by line.
 */

import assert from "node:assert/strict";

/** One scrape: each sample by its name and sorted labels, `name{a="x",b="y"}`. */
export type Samples = Map<string, number>;

const NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/;
const LABEL = /^([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)/;

/**
 * Parses Prometheus's text format (version 0.0.4), asserting what it requires: HELP and
 * TYPE before a family's samples, each family once, samples named after their family
 * (`_bucket`, `_sum`, `_count` for histograms), counters ending in `_total`, and
 * histogram buckets that never decrease and end at +Inf equal to `_count`.
 */
export function parseExposition(text: string): Samples {
  assert.ok(text.endsWith("\n"), "the text ends with a newline");
  const samples: Samples = new Map();
  const types = new Map<string, string>();
  let family: string | null = null;
  for (const line of text.split("\n")) {
    if (line === "") continue;
    const comment = /^# (HELP|TYPE) (\S+) (.*)$/.exec(line);
    if (comment !== null) {
      const [, kind, name, rest] = comment as unknown as [string, string, string, string];
      assert.match(name, NAME);
      if (kind === "TYPE") {
        assert.ok(!types.has(name), `${name} has one TYPE`);
        assert.ok(["counter", "gauge", "histogram", "summary", "untyped"].includes(rest), line);
        if (rest === "counter") {
          assert.ok(name.endsWith("_total"), `counter ${name} ends in _total`);
        }
        types.set(name, rest);
      }
      family = name;
      continue;
    }
    assert.ok(!line.startsWith("#"), `a comment is HELP or TYPE: ${line}`);
    const sample = SAMPLE.exec(line);
    assert.ok(sample !== null, `a sample line: ${line}`);
    const [, name, labelText = "", valueText] = sample as unknown as [
      string,
      string,
      string | undefined,
      string,
    ];
    assert.ok(family !== null && types.has(family), `${name} comes after its TYPE`);
    const suffixes = types.get(family) === "histogram" ? ["_bucket", "_sum", "_count"] : [""];
    assert.ok(suffixes.some((s) => name === family + s), `${name} belongs to ${family}`);
    const labels: string[] = [];
    for (let rest = labelText; rest !== "";) {
      const label = LABEL.exec(rest);
      assert.ok(label !== null, `labels of ${line}`);
      labels.push(`${label[1]}="${label[2]}"`);
      rest = rest.slice(label[0].length);
    }
    const value = valueText === "+Inf" ? Infinity : Number(valueText);
    assert.ok(!Number.isNaN(value) || /^nan$/i.test(valueText), `a number: ${line}`);
    const key = `${name}${labels.length === 0 ? "" : `{${labels.sort().join(",")}}`}`;
    assert.ok(!samples.has(key), `${key} appears once`);
    samples.set(key, value);
  }
  for (const [name, type] of types) {
    if (type === "histogram") checkBuckets(samples, name);
  }
  return samples;
}

/** Each series of histogram `name`: buckets never decrease, and +Inf holds `_count`. */
function checkBuckets(samples: Samples, name: string): void {
  const series = new Map<string, { le: number; count: number }[]>();
  for (const [key, count] of samples) {
    if (!key.startsWith(`${name}_bucket{`)) continue;
    const labels = key.slice(`${name}_bucket{`.length, -1).split(/,(?=[a-zA-Z_]+=")/);
    const le = labels.find((label) => label.startsWith("le="))!.slice(4, -1);
    const rest = labels.filter((label) => !label.startsWith("le=")).join(",");
    const buckets = series.get(rest) ?? [];
    buckets.push({ le: le === "+Inf" ? Infinity : Number(le), count });
    series.set(rest, buckets);
  }
  for (const [labels, buckets] of series) {
    buckets.sort((x, y) => x.le - y.le);
    for (let i = 1; i < buckets.length; i++) {
      assert.ok(buckets[i]!.count >= buckets[i - 1]!.count, `${name}{${labels}} buckets grow`);
    }
    assert.equal(buckets.at(-1)!.le, Infinity, `${name}{${labels}} has a +Inf bucket`);
    const count = samples.get(`${name}_count${labels === "" ? "" : `{${labels}}`}`);
    assert.equal(buckets.at(-1)!.count, count, `${name}{${labels}}: +Inf is the count`);
  }
}

export async function scrape(url: string): Promise<Samples> {
  const response = await fetch(url);
  assert.equal(response.status, 200);
  assert.match(response.headers.get("content-type") ?? "", /^text\/plain; version=0\.0\.4/);
  return parseExposition(await response.text());
}

export function value(samples: Samples, key: string): number {
  const found = samples.get(key);
  assert.ok(found !== undefined, `${key} is among the metrics`);
  return found;
}

/** How much each of `keys` moved from `before` to `after`. */
export function moved(before: Samples, after: Samples, keys: string[]): Record<string, number> {
  return Object.fromEntries(keys.map((key) => [key, value(after, key) - value(before, key)]));
}
