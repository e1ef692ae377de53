/**
 * `--metrics [HOST]:PORT` through the real CLI: an export's counters move by exactly
 * the I/O done and its latency histograms count every request; a mirror shows each
 * leg's state and what a detached leg has missed; an attach shows what it asked of
 * its export. Every scrape is also checked against the text exposition format (the
 * parser below refuses what Prometheus would).
 */

import assert from "node:assert/strict";
import { RemoteDevice } from "../../src/client/remote_device.ts";
import { silentLogger as quiet } from "../../src/lib/log.ts";
import { parseHostPort } from "../../src/lib/address.ts";
import { allInSyncAndClean, memberName, waitForMirror } from "../helpers/array.ts";
import { exportImage, runDst, scenario, startAttach, startDst } from "../helpers/spawn.ts";
import { missing, toolOk } from "../helpers/tools.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

/** One scrape: each sample by its name and sorted labels, `name{a="x",b="y"}`. */
type Samples = Map<string, number>;

const NAME = /^[a-zA-Z_:][a-zA-Z0-9_:]*$/;
const SAMPLE = /^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$/;
const LABEL = /^([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"(?:,|$)/;

/**
 * Parses Prometheus's text format (version 0.0.4), asserting what it requires: HELP and
 * TYPE before a family's samples, each family once, samples named after their family
 * (`_bucket`, `_sum`, `_count` for histograms), counters ending in `_total`, and
 * histogram buckets that never decrease and end at +Inf equal to `_count`.
 */
function parseExposition(text: string): Samples {
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

async function scrape(url: string): Promise<Samples> {
  const response = await fetch(url);
  assert.equal(response.status, 200);
  assert.match(response.headers.get("content-type") ?? "", /^text\/plain; version=0\.0\.4/);
  return parseExposition(await response.text());
}

function value(samples: Samples, key: string): number {
  const found = samples.get(key);
  assert.ok(found !== undefined, `${key} is among the metrics`);
  return found;
}

/** How much each of `keys` moved from `before` to `after`. */
function moved(before: Samples, after: Samples, keys: string[]): Record<string, number> {
  return Object.fromEntries(keys.map((key) => [key, value(after, key) - value(before, key)]));
}

Deno.test("export --metrics: counters move by the I/O done, and each request is timed once", () =>
  scenario("dst-metrics-export-", async (dir, track) => {
    const server = track(
      await startDst(
        [
          "export",
          `${dir}/disk.img`,
          "--create",
          "4M",
          "--listen",
          "127.0.0.1:0",
          "--metrics",
          "127.0.0.1:0",
        ],
        /metrics at (\S+)\n[^]* on (\S+)\n/,
      ),
    );
    const url = server.ready[1]!;
    const address = parseHostPort(server.ready[2]!, "127.0.0.1");
    const notFound = await fetch(url.replace(/\/metrics$/, "/"));
    assert.equal(notFound.status, 404);
    await notFound.body?.cancel();

    const before = await scrape(url);
    assert.ok(value(before, "process_resident_memory_bytes") > 0, "the process's memory");
    assert.ok(value(before, "nodejs_heap_size_used_bytes") > 0);
    const device = await RemoteDevice.connect(address, { log: quiet });
    try {
      for (let i = 0; i < 3; i++) await device.write(i * 4 * KiB, new Uint8Array(4 * KiB).fill(i));
      await device.read(0, new Uint8Array(8 * KiB));
      await device.read(64 * KiB, new Uint8Array(8 * KiB));
      await device.flush();
      await device.discard(MiB, 64 * KiB);
      await device.writeZeroes(2 * MiB, 128 * KiB);
      const after = await scrape(url);
      assert.deepEqual(
        moved(before, after, [
          "dst_export_reads_total",
          "dst_export_read_bytes_total",
          "dst_export_writes_total",
          "dst_export_write_bytes_total",
          "dst_export_flushes_total",
          "dst_export_discards_total",
          "dst_export_discard_bytes_total",
          "dst_export_write_zeroes_total",
          "dst_export_write_zeroes_bytes_total",
          'dst_export_errors_total{kind="device"}',
          'dst_export_errors_total{kind="protocol"}',
        ]),
        {
          dst_export_reads_total: 2,
          dst_export_read_bytes_total: 16 * KiB,
          dst_export_writes_total: 3,
          dst_export_write_bytes_total: 12 * KiB,
          dst_export_flushes_total: 1,
          dst_export_discards_total: 1,
          dst_export_discard_bytes_total: 64 * KiB,
          dst_export_write_zeroes_total: 1,
          dst_export_write_zeroes_bytes_total: 128 * KiB,
          'dst_export_errors_total{kind="device"}': 0,
          'dst_export_errors_total{kind="protocol"}': 0,
        },
      );
      const count = (op: string) => `dst_export_request_duration_seconds_count{op="${op}"}`;
      assert.deepEqual(
        moved(before, after, ["read", "write", "flush", "discard", "write_zeroes"].map(count)),
        {
          [count("read")]: 2,
          [count("write")]: 3,
          [count("flush")]: 1,
          [count("discard")]: 1,
          [count("write_zeroes")]: 1,
        },
      );
      assert.ok(value(after, 'dst_export_request_duration_seconds_sum{op="write"}') > 0);
      assert.equal(value(after, "dst_export_clients"), 1);
      assert.equal(value(after, "dst_export_in_flight_requests"), 0);
    } finally {
      await device.close();
    }
    const status = await server.stop("SIGTERM");
    assert.equal(status.code, 0, server.log());
  }));

Deno.test("array mirror --metrics: each leg's state, and what a detached leg missed", () =>
  scenario("dst-metrics-mirror-", async (dir, track) => {
    const a = track(await exportImage(dir, "a.img", "4M"));
    const b = track(await exportImage(dir, "b.img", "4M"));
    const legs = [memberName(a.address), memberName(b.address)];
    const mirror = track(
      await startDst(
        [
          "array",
          "mirror",
          ...legs,
          "--source",
          legs[0]!,
          "--state",
          `${dir}/state`,
          "--region",
          "64K",
          "--export",
          "127.0.0.1:0",
          "--metrics",
          "127.0.0.1:0",
        ],
        /metrics at (\S+)\n[^]* on (\S+)\n/,
      ),
    );
    const url = mirror.ready[1]!;
    const address = parseHostPort(mirror.ready[2]!, "127.0.0.1");
    await waitForMirror(address, allInSyncAndClean);
    const state = (leg: string, mode: string) =>
      `dst_mirror_leg_state{leg="${leg}",state="${mode}"}`;
    const synced = await scrape(url);
    for (const leg of legs) {
      assert.equal(value(synced, state(leg, "in-sync")), 1);
      assert.equal(value(synced, state(leg, "detached")), 0);
      assert.equal(value(synced, `dst_mirror_leg_dirty_regions{leg="${leg}"}`), 0);
      assert.equal(value(synced, `dst_mirror_leg_resync_remaining_bytes{leg="${leg}"}`), 0);
    }
    assert.equal(value(synced, "dst_mirror_resynced_bytes_total"), 4 * MiB, "the first copy");

    const detach = await runDst(["array", "detach", memberName(address), legs[1]!]);
    assert.equal(detach.code, 0, detach.stderr);
    const device = await RemoteDevice.connect(address, { log: quiet });
    try {
      await device.write(0, new Uint8Array(4 * KiB).fill(7));
      await device.write(3 * MiB, new Uint8Array(4 * KiB).fill(8));
    } finally {
      await device.close();
    }
    const detached = await scrape(url);
    assert.equal(value(detached, state(legs[0]!, "in-sync")), 1);
    assert.equal(value(detached, state(legs[1]!, "detached")), 1);
    assert.equal(value(detached, state(legs[1]!, "in-sync")), 0);
    assert.equal(value(detached, `dst_mirror_leg_dirty_regions{leg="${legs[1]}"}`), 2);
    assert.equal(
      value(detached, `dst_mirror_leg_resync_remaining_bytes{leg="${legs[1]}"}`),
      2 * 64 * KiB,
      "two regions of 64K to copy when it is back",
    );
    assert.equal(value(detached, "dst_export_writes_total"), 2);
    const status = await mirror.stop("SIGTERM");
    assert.equal(status.code, 0, mirror.log());
  }));

Deno.test({
  name: "attach --metrics: what the attach asked of its export",
  ignore: missing("nbdsh"),
  fn: () =>
    scenario("dst-metrics-attach-", async (dir, track) => {
      const server = track(await exportImage(dir, "disk.img", "4M"));
      const attach = track(
        await startAttach([
          memberName(server.address),
          "--listen",
          "127.0.0.1:0",
          "--metrics",
          "127.0.0.1:0",
        ]),
      );
      const url = /metrics at (\S+)\n/.exec(attach.ready.input ?? "")?.[1];
      assert.ok(url !== undefined, `the metrics line comes first: ${attach.ready.input}`);
      const before = await scrape(url);
      assert.equal(value(before, "dst_client_connected"), 1);
      await toolOk("nbdsh", [
        "-u",
        attach.uri,
        "-c",
        "h.pwrite(b'\\x01' * 4096, 0); h.pread(8192, 4096); h.flush()",
      ]);
      const after = await scrape(url);
      assert.deepEqual(
        moved(before, after, [
          "dst_client_reads_total",
          "dst_client_read_bytes_total",
          "dst_client_writes_total",
          "dst_client_write_bytes_total",
          "dst_client_flushes_total",
          "dst_client_errors_total",
          "dst_client_reconnects_total",
        ]),
        {
          dst_client_reads_total: 1,
          dst_client_read_bytes_total: 8192,
          dst_client_writes_total: 1,
          dst_client_write_bytes_total: 4096,
          dst_client_flushes_total: 1,
          dst_client_errors_total: 0,
          dst_client_reconnects_total: 0,
        },
      );
      const status = await attach.stop("SIGTERM");
      assert.equal(status.code, 0, attach.log());
    }),
});
