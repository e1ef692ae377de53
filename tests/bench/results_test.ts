/**
 * The bench's results files: their names (one per run, a day's later runs numbered),
 * the CPU line, the markdown around tables, the header, the write itself, and the
 * console capture that feeds them.
 */

import assert from "node:assert/strict";
import {
  captureConsole,
  cpuSummary,
  markdownBody,
  resultsFileName,
  resultsMarkdown,
  type RunInfo,
  writeResults,
} from "./results.ts";

const NOON = new Date("2026-11-21T12:00:00Z");

Deno.test("resultsFileName: the UTC day, then -2, -3, ... after the highest taken", () => {
  assert.equal(resultsFileName(NOON, []), "2026-11-21.md");
  assert.equal(resultsFileName(NOON, ["2026-11-20.md", "README.md"]), "2026-11-21.md");
  assert.equal(resultsFileName(NOON, ["2026-11-21.md"]), "2026-11-21-2.md");
  assert.equal(
    resultsFileName(NOON, ["2026-11-21.md", "2026-11-21-2.md", "2026-11-21-3.md"]),
    "2026-11-21-4.md",
  );
  // After the highest, even past a gap, so a day's names sort in the order its runs ran.
  assert.equal(resultsFileName(NOON, ["2026-11-21.md", "2026-11-21-3.md"]), "2026-11-21-4.md");
  assert.equal(resultsFileName(NOON, ["2026-11-21-2.md"]), "2026-11-21-3.md");
  assert.equal(resultsFileName(NOON, ["2026-11-21-x.md", "2026-11-21.md.bak"]), "2026-11-21.md");
});

Deno.test("resultsFileName: the day is UTC's, whatever the local zone", () => {
  assert.equal(resultsFileName(new Date("2026-11-21T23:30:00-05:00"), []), "2026-11-22.md");
  assert.equal(resultsFileName(new Date("2026-01-01T00:00:00Z"), []), "2026-01-01.md");
});

Deno.test("cpuSummary: each model with its count", () => {
  const cpu = (n: number, model: string) => `processor\t: ${n}\nmodel name\t: ${model}\n\n`;
  assert.equal(cpuSummary(cpu(0, "Xeon") + cpu(1, "Xeon")), "2 × Xeon");
  assert.equal(cpuSummary(cpu(0, "Big") + cpu(1, "Little")), "1 × Big, 1 × Little");
  assert.match(cpuSummary("processor : 0\n"), /^unknown/);
});

Deno.test("markdownBody: a blank line around each table, one blank line at most, trimmed", () => {
  const output = [
    "",
    "Title line",
    "| a | b |",
    "|---|--:|",
    "| 1 | 2 |",
    "after the table",
    "",
    "",
    "- a note",
  ].join("\n");
  assert.equal(
    markdownBody(output),
    [
      "Title line",
      "",
      "| a | b |",
      "|---|--:|",
      "| 1 | 2 |",
      "",
      "after the table",
      "",
      "- a note",
    ].join("\n"),
  );
});

const INFO: RunInfo = {
  started: new Date("2026-11-21T12:34:56.789Z"),
  seconds: 61.4,
  commit: "abc1234",
  dirtyPaths: [],
  deno: "2.9.6 (V8 x, TypeScript y)",
  cpu: "2 × Xeon",
  command: "deno task bench --only sim",
};

Deno.test("resultsMarkdown: the header says when, what, where and how; then the output", () => {
  const text = resultsMarkdown(INFO, "\nSim: 300 seeds\n");
  assert.equal(
    text,
    [
      "# Bench run, 2026-11-21 12:34:56 UTC",
      "",
      "- started: 2026-11-21 12:34:56 UTC, took 61 s",
      "- commit: abc1234 (clean tree)",
      "- deno: 2.9.6 (V8 x, TypeScript y)",
      "- CPU: 2 × Xeon",
      "- command: `deno task bench --only sim`",
      "",
      "Sim: 300 seeds",
      "",
    ].join("\n"),
  );
  const dirty = resultsMarkdown({ ...INFO, dirtyPaths: ["src/a.ts", "tests/b.ts"] }, "");
  assert.match(
    dirty,
    /- commit: abc1234 \(dirty tree: uncommitted changes in src\/a\.ts, tests\/b\.ts\)/,
  );
  assert.match(resultsMarkdown({ ...INFO, dirtyPaths: null }, ""), /clean is unknown/);
});

Deno.test("writeResults: a new file each run, never over an earlier one", async () => {
  const dir = await Deno.makeTempDir({ prefix: "dst-bench-results-" });
  try {
    const url = new URL(`file://${dir}/results/`);
    assert.equal(await writeResults(url, INFO, "first"), "2026-11-21.md");
    assert.equal(await writeResults(url, INFO, "second"), "2026-11-21-2.md");
    assert.match(await Deno.readTextFile(`${dir}/results/2026-11-21.md`), /first\n$/);
    assert.match(await Deno.readTextFile(`${dir}/results/2026-11-21-2.md`), /second\n$/);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("captureConsole: records what is printed, still prints it, and puts the console back", () => {
  const printed: unknown[][] = [];
  const original = console.log;
  console.log = (...args: unknown[]) => printed.push(args);
  try {
    const capture = captureConsole();
    console.log("rate", 3, { a: 1 });
    capture.stop();
    console.log("after");
    assert.equal(capture.text(), "rate 3 { a: 1 }");
    assert.deepEqual(printed, [["rate", 3, { a: 1 }], ["after"]]);
  } finally {
    console.log = original;
  }
});
