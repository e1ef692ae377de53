/**
 * `--metrics [HOST]:PORT` through the real CLI: an export's counters move by exactly
 * the I/O done and its latency histograms count every request; a mirror shows each
 * leg's state and what a detached leg has missed; an attach shows what it asked of
 * its export. Every scrape is also checked against the text exposition format
 * (tests/helpers/prometheus.ts refuses what Prometheus would).
 */

import assert from "node:assert/strict";
import { RemoteDevice } from "../../src/client/remote_device.ts";
import { silentLogger as quiet } from "../../src/lib/log.ts";
import { parseHostPort } from "../../src/lib/address.ts";
import { allInSyncAndClean, memberName, waitForMirror } from "../helpers/array.ts";
import { exportImage, runDst, scenario, startAttach, startDst } from "../helpers/spawn.ts";
import { missing, toolOk } from "../helpers/tools.ts";
import { moved, scrape, value } from "../helpers/prometheus.ts";

const KiB = 1024;
const MiB = 1024 * KiB;

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
