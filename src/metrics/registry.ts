/**
 * What `--metrics` shows, as prom-client metrics in one Registry per process. Counters
 * and gauges are read at scrape time from the status()/stats() the code already keeps
 * (each metric's `collect` sets it), so the data path gains nothing for them. The one
 * thing measured on the data path is the DST port's request latency: one clock read
 * at dispatch, one at the reply, and one histogram observe (about half a microsecond
 * in prom-client, paid only when --metrics is given).
 *
 * Not covered: NBD requests served by `--nbd-threads` workers (or this thread's NBD
 * port) count in the export's counters, which status() sums over every thread, but
 * are not timed: the latency histograms are the DST port's.
 */

import { collectDefaultMetrics, Counter, Gauge, Histogram, Registry } from "prom-client";
import type { DeviceStats } from "../device/block_device.ts";
import type { LegMode, MirrorStatus } from "../array/mirror.ts";
import type { RequestTiming, TimedOp } from "../server/export_connection.ts";

/**
 * Latency buckets in seconds: a loopback read from the page cache takes tens of
 * microseconds, a flush to a disk milliseconds, a request riding out an outage seconds.
 */
export const LATENCY_BUCKETS_SECONDS = [
  0.00005,
  0.0001,
  0.00025,
  0.0005,
  0.001,
  0.0025,
  0.005,
  0.01,
  0.025,
  0.05,
  0.1,
  0.25,
  0.5,
  1,
  2.5,
  5,
  10,
];

const TIMED_OPS: readonly TimedOp[] = ["read", "write", "flush", "discard", "write_zeroes"];
const LEG_MODES: readonly LegMode[] = ["in-sync", "resyncing", "out-of-sync", "detached"];

/**
 * prom-client's default metrics that Deno does not feed: its perf_hooks stubs report an
 * event loop delay of 0 (and a minimum of 2^63 ns), no GC events, and no libuv handles.
 * Left out rather than shown wrong.
 */
const DEFAULTS_DENO_LACKS = [
  "nodejs_eventloop_lag",
  "nodejs_gc_duration_seconds",
  "nodejs_active_",
];

/**
 * A registry with the process's own metrics: CPU, resident and heap memory, open
 * files, start time (prom-client's defaults, less those Deno does not feed).
 */
export function processRegistry(): Registry {
  const registry = new Registry();
  collectDefaultMetrics({ register: registry });
  for (const metric of registry.getMetricsAsArray()) {
    if (DEFAULTS_DENO_LACKS.some((prefix) => metric.name.startsWith(prefix))) {
      registry.removeSingleMetric(metric.name);
    }
  }
  return registry;
}

/** What an export's metrics read at scrape time. */
export interface ExportSource {
  /** The device's counters (over every thread that serves it). */
  stats(): DeviceStats;
  /** Errors by kind; `device` is stats().errors. */
  errors(): { device: number; protocol: number; tampered: number };
  clients(): number;
  inFlight(): number;
}

/**
 * Registers an export's metrics (`dst_export_...`) and returns where its DST port puts
 * request times.
 */
export function registerExport(registry: Registry, source: ExportSource): RequestTiming {
  registerDeviceCounters(registry, "dst_export", "the export served", () => source.stats());
  new Counter({
    name: "dst_export_errors_total",
    help: "Errors by kind: device (a device call failed), protocol (a request or handshake " +
      "refused, a frame that broke the protocol), tampered (a record failed its check)",
    labelNames: ["kind"],
    registers: [registry],
    collect() {
      const errors = source.errors();
      this.reset();
      this.inc({ kind: "device" }, errors.device);
      this.inc({ kind: "protocol" }, errors.protocol);
      this.inc({ kind: "tampered" }, errors.tampered);
    },
  });
  gauge(
    registry,
    "dst_export_in_flight_requests",
    "DST requests dispatched and not yet answered",
    () => source.inFlight(),
  );
  gauge(registry, "dst_export_clients", "DST client connections", () => source.clients());
  const histogram = new Histogram({
    name: "dst_export_request_duration_seconds",
    help: "Time from a DST request's dispatch to its reply being queued, by operation " +
      "(the DST port only: NBD requests are counted but not timed)",
    labelNames: ["op"],
    buckets: LATENCY_BUCKETS_SECONDS,
    registers: [registry],
  });
  // Every operation shows from the start, at 0, so a rate() has a first sample.
  const labels = Object.fromEntries(TIMED_OPS.map((op) => [op, { op }])) as Record<
    TimedOp,
    { op: TimedOp }
  >;
  for (const op of TIMED_OPS) histogram.zero(labels[op]);
  return { observe: (op, seconds) => histogram.observe(labels[op], seconds) };
}

/** What `dst attach` reads of its DST client (RemoteDevice) at scrape time. */
export interface ClientSource {
  stats(): DeviceStats;
  transportStats(): {
    inFlight: number;
    queued: number;
    reconnects: number;
    resends: number;
    fencedWrites: number;
    connected: boolean;
  };
}

/** Registers a DST client's metrics (`dst_client_...`): what `dst attach` asked of its export. */
export function registerClient(registry: Registry, client: ClientSource): void {
  registerDeviceCounters(registry, "dst_client", "sent to the export", () => client.stats());
  counter(registry, "dst_client_errors_total", "Requests that failed", () => client.stats().errors);
  const transport = () => client.transportStats();
  gauge(
    registry,
    "dst_client_in_flight_requests",
    "Requests sent and not yet answered",
    () => transport().inFlight,
  );
  gauge(
    registry,
    "dst_client_queued_requests",
    "Requests waiting to be sent",
    () => transport().queued,
  );
  gauge(
    registry,
    "dst_client_connected",
    "1 while a connection to the export is up",
    () => transport().connected ? 1 : 0,
  );
  counter(
    registry,
    "dst_client_reconnects_total",
    "Connections made again",
    () => transport().reconnects,
  );
  counter(
    registry,
    "dst_client_resends_total",
    "Requests sent again on a new connection",
    () => transport().resends,
  );
  counter(
    registry,
    "dst_client_fenced_writes_total",
    "Writes whose connection was fenced before their reply",
    () => transport().fencedWrites,
  );
}

/**
 * Registers a mirror's per-leg metrics (`dst_mirror_...`, label `leg`). A leg's state is
 * one gauge per state, 1 for the state it is in (the enum style of Prometheus), so an
 * alert is `dst_mirror_leg_state{state="in-sync"} == 0`.
 */
export function registerMirror(registry: Registry, status: () => MirrorStatus): void {
  perLeg(
    registry,
    "dst_mirror_leg_state",
    "1 for the state the leg is in, 0 for the others",
    [
      "state",
    ],
    status,
    (set, leg) => {
      for (const mode of LEG_MODES) set({ state: mode }, leg.state === mode ? 1 : 0);
    },
  );
  perLeg(
    registry,
    "dst_mirror_leg_dirty_regions",
    "Regions marked dirty for the leg",
    [],
    status,
    (set, leg) => set({}, leg.dirtyRegions),
  );
  perLeg(
    registry,
    "dst_mirror_leg_in_flight_requests",
    "Requests sent to the leg and not yet done",
    [],
    status,
    (set, leg) => set({}, leg.inFlight),
  );
  perLeg(
    registry,
    "dst_mirror_leg_resync_done_bytes",
    "Bytes the resync under way has copied to the leg (0 when none is)",
    [],
    status,
    (set, leg) => set({}, leg.resync?.bytesCopied ?? 0),
  );
  perLeg(
    registry,
    "dst_mirror_leg_resync_remaining_bytes",
    "Bytes still to copy to the leg: the regions a resync under way has left, or the " +
      "dirty regions of a leg out of sync or detached (at most the mirror's size)",
    [],
    status,
    (set, leg, mirror) => {
      const regions = leg.state === "in-sync"
        ? 0
        : leg.resync !== undefined
        ? leg.resync.regionsTotal - leg.resync.regionsDone
        : leg.dirtyRegions;
      set({}, Math.min(regions * mirror.regionBytes, mirror.sizeBytes));
    },
  );
  new Counter({
    name: "dst_mirror_leg_errors_total",
    help: "Requests that failed on the leg",
    labelNames: ["leg"],
    registers: [registry],
    collect() {
      this.reset();
      for (const leg of status().members) this.inc({ leg: leg.name }, leg.errors);
    },
  });
  counter(
    registry,
    "dst_mirror_resynced_bytes_total",
    "Bytes resyncs copied since the process started",
    () => status().resyncedBytes,
  );
}

/** The counters every device keeps (DeviceStats), as `${prefix}_reads_total` and so on. */
function registerDeviceCounters(
  registry: Registry,
  prefix: string,
  what: string,
  stats: () => DeviceStats,
): void {
  const fields: [string, string, keyof DeviceStats][] = [
    ["reads_total", "Reads", "reads"],
    ["read_bytes_total", "Bytes read", "readBytes"],
    ["writes_total", "Writes", "writes"],
    ["write_bytes_total", "Bytes written", "writtenBytes"],
    ["flushes_total", "Flushes", "flushes"],
    ["discards_total", "Discards", "discards"],
    ["discard_bytes_total", "Bytes discarded", "discardBytes"],
    ["write_zeroes_total", "Write-zeroes requests", "zeroes"],
    ["write_zeroes_bytes_total", "Bytes zeroed by write-zeroes", "zeroBytes"],
  ];
  for (const [suffix, help, field] of fields) {
    counter(registry, `${prefix}_${suffix}`, `${help} ${what}`, () => stats()[field]);
  }
}

function counter(registry: Registry, name: string, help: string, read: () => number): void {
  new Counter({
    name,
    help,
    registers: [registry],
    collect() {
      this.reset();
      this.inc(read());
    },
  });
}

function gauge(registry: Registry, name: string, help: string, read: () => number): void {
  new Gauge({
    name,
    help,
    registers: [registry],
    collect() {
      this.set(read());
    },
  });
}

type LegSetter = (labels: Record<string, string>, value: number) => void;

/** A gauge with a series per leg (label `leg`), rebuilt at each scrape: legs come and go. */
function perLeg(
  registry: Registry,
  name: string,
  help: string,
  labelNames: string[],
  status: () => MirrorStatus,
  each: (set: LegSetter, leg: MirrorStatus["members"][number], mirror: MirrorStatus) => void,
): void {
  new Gauge({
    name,
    help,
    labelNames: ["leg", ...labelNames],
    registers: [registry],
    collect() {
      const mirror = status();
      this.reset();
      for (const leg of mirror.members) {
        each((labels, value) => this.set({ leg: leg.name, ...labels }, value), leg, mirror);
      }
    },
  });
}
