/**
 * `dst status` through the real CLI: --watch outside a terminal (timestamped tables
 * with rates, one JSON line or YAML document per interval, SIGINT ends it with 0),
 * --yaml alone, bad --watch values, and a mirror leg whose export was killed, shown as
 * not connected by the very next status. The in-place terminal frames are checked
 * through renderFrame (src/cli/status_view_test.ts): a test has no terminal.
 */

import assert from "node:assert/strict";
import { parse as parseYaml, parseAllDocuments } from "yaml";
import { DENO_RUN_ARGS } from "../../src/cli/self.ts";
import type { WatchDocument } from "../../src/cli/status_view.ts";
import { formatHostPort } from "../../src/lib/address.ts";
import { leg, memberName, startNewMirror, waitForMirror } from "../helpers/array.ts";
import {
  BUNDLE,
  exportImage,
  freshBundle,
  newDisk,
  runDst,
  scenario,
  TEST_STATE_HOME,
  withExport,
} from "../helpers/spawn.ts";

/** An interval's timestamp line: UTC, to the second. */
const TIMESTAMP = /^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$/;
const TIMESTAMP_LINES = new RegExp(TIMESTAMP.source, "gm");

/** How long a watch may take to print what a test waits for before it fails. */
const WATCH_DEADLINE_MS = 15_000;

/**
 * Runs `dst status ARGS...` (with --watch) until its stdout satisfies `enough` (checked
 * on every chunk) or WATCH_DEADLINE_MS passed, then sends SIGINT; resolves with its exit
 * code and everything it printed.
 */
async function watchUntil(
  args: string[],
  enough: (stdout: string) => boolean,
): Promise<{ code: number; stdout: string; stderr: string }> {
  await freshBundle();
  const child = new Deno.Command(Deno.execPath(), {
    args: [...DENO_RUN_ARGS, BUNDLE, "status", ...args],
    env: { XDG_STATE_HOME: TEST_STATE_HOME },
    stdout: "piped",
    stderr: "piped",
  }).spawn();
  const stderr = new Response(child.stderr).text();
  const reader = child.stdout.pipeThrough(new TextDecoderStream()).getReader();
  const deadline = setTimeout(() => child.kill("SIGINT"), WATCH_DEADLINE_MS);
  let stdout = "";
  let interrupted = false;
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    stdout += value;
    if (!interrupted && enough(stdout)) {
      interrupted = true;
      child.kill("SIGINT");
    }
  }
  clearTimeout(deadline);
  const { code } = await child.status;
  return { code, stdout, stderr: await stderr };
}

Deno.test("dst status --watch 1 outside a terminal: timestamped tables, 0 IOPS when idle, SIGINT exits 0", () =>
  withExport("dst-status-watch-", newDisk("16M"), async (server) => {
    const at = formatHostPort(server.address);
    const result = await watchUntil(
      [at, "--watch", "1"],
      (stdout) => (stdout.match(TIMESTAMP_LINES) ?? []).length >= 2 && stdout.endsWith("\n\n"),
    );
    assert.equal(result.code, 0, result.stderr);
    assert.ok(!result.stdout.includes("\x1b"), "no escape codes outside a terminal");
    const frames = result.stdout.split("\n\n").filter((frame) => frame !== "");
    assert.ok(frames.length >= 2, result.stdout);
    for (const [i, frame] of frames.entries()) {
      const [time, header, row] = frame.split("\n");
      assert.match(time!, TIMESTAMP);
      const columns = header!.split(/ {2,}/);
      const cells = row!.split(/ {2,}/);
      assert.equal(cells.length, columns.length, frame);
      const cell = (name: string) => cells[columns.indexOf(name)];
      assert.equal(cell("ADDRESS"), at);
      // The first sample has nothing to compare with; then an idle export does nothing.
      assert.equal(cell("IOPS"), i === 0 ? "-" : "0", frame);
      assert.equal(cell("MIB/S"), i === 0 ? "-" : "0.0", frame);
    }
  }));

Deno.test("dst status --watch --json: one line per interval, each parses, with rates after the first", () =>
  withExport("dst-status-watch-json-", newDisk("16M"), async (server) => {
    const result = await watchUntil(
      ["--watch", "1", "--json", formatHostPort(server.address)],
      (stdout) => stdout.split("\n").length > 2,
    );
    assert.equal(result.code, 0, result.stderr);
    const lines = result.stdout.trimEnd().split("\n");
    assert.ok(lines.length >= 2, result.stdout);
    const documents = lines.map((line) => JSON.parse(line) as WatchDocument);
    for (const [i, document] of documents.entries()) {
      assert.match(document.time, TIMESTAMP);
      const [row] = document.exports;
      assert.equal(row!.address, formatHostPort(server.address));
      assert.equal(row!.status?.sizeBytes, 16 * 1024 * 1024);
      assert.deepEqual(row!.rates, i === 0 ? null : { iops: 0, bytesPerSecond: 0 });
    }
  }));

Deno.test("dst status --yaml parses with the yaml package, alone and with --watch (--- between documents)", () =>
  withExport("dst-status-yaml-", newDisk("16M"), async (server) => {
    const at = formatHostPort(server.address);
    const once = await runDst(["status", at, "--yaml"]);
    assert.equal(once.code, 0, once.stderr);
    const rows = parseYaml(once.stdout) as Array<
      { address: string; status: { sizeBytes: number } }
    >;
    assert.equal(rows[0]!.address, at);
    assert.equal(rows[0]!.status.sizeBytes, 16 * 1024 * 1024);

    const watched = await watchUntil(
      [at, "--yaml", "--watch", "1"],
      (stdout) => (stdout.match(/^---$/gm) ?? []).length >= 3,
    );
    assert.equal(watched.code, 0, watched.stderr);
    const documents = parseAllDocuments(watched.stdout);
    assert.ok(Array.isArray(documents) && documents.length >= 2, watched.stdout);
    for (const [i, document] of documents.entries()) {
      assert.deepEqual(document.errors, []);
      const value = document.toJS() as WatchDocument;
      assert.equal(value.exports[0]!.address, at);
      assert.deepEqual(value.exports[0]!.rates, i === 0 ? null : { iops: 0, bytesPerSecond: 0 });
    }
  }));

Deno.test("dst status refuses bad --watch values and two formats (exit 2, saying what is allowed)", async () => {
  for (const args of [["--watch", "0"], ["--watch", "1.5"], ["--watch=x"], ["--watch", "-3"]]) {
    const result = await runDst(["status", "127.0.0.1:1", ...args]);
    assert.equal(result.code, 2, `${args.join(" ")}: ${result.stderr}`);
    assert.match(
      result.stderr,
      /^dst status: --watch takes a whole number of seconds from 1 to 3600/,
    );
  }
  const both = await runDst(["status", "127.0.0.1:1", "--json", "--yaml"]);
  assert.equal(both.code, 2);
  assert.match(both.stderr, /--json and --yaml are two formats/);
});

Deno.test("a mirror leg whose export was killed shows as not connected in the next status", () =>
  scenario("dst-status-leg-", async (dir, track) => {
    const a = track(await exportImage(dir, "a.img", "8M"));
    const b = track(await exportImage(dir, "b.img", "8M"));
    const [legA, legB] = [memberName(a.address), memberName(b.address)];
    const mirror = track(await startNewMirror([legA, legB], `${dir}/state`));
    const synced = await waitForMirror(mirror.address);
    assert.equal(leg(synced, legB).connected, true);

    await b.stop("SIGKILL");
    const json = await runDst(["status", memberName(mirror.address), "--json"]);
    assert.equal(json.code, 0, json.stderr);
    const members = JSON.parse(json.stdout)[0].status.array.members;
    const down = members.find((m: { name: string }) => m.name === legB);
    assert.equal(down.connected, false, JSON.stringify(down));
    assert.equal(members.find((m: { name: string }) => m.name === legA).connected, true);

    const table = await runDst(["status", memberName(mirror.address)]);
    assert.match(table.stdout, /: mirror, 8\.0 MiB, regions of .* \(degraded\)\n/);
    assert.match(table.stdout, new RegExp(`${legB}\\s+\\S+ \\(reconnecting\\)\\s`));
    assert.doesNotMatch(table.stdout, new RegExp(`${legA}\\s+\\S+ \\(reconnecting\\)`));
  }));
