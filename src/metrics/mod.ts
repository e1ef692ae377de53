/**
 * `--metrics`: Prometheus metrics over HTTP (registry.ts: what is shown; metrics_server.ts:
 * serving it; node_metrics.ts: one /metrics for every item `dst up` runs).
 */

export {
  type ClientSource,
  type ExportSource,
  LATENCY_BUCKETS_SECONDS,
  processRegistry,
  registerClient,
  registerExport,
  registerMirror,
} from "./registry.ts";
export { METRICS_PATH, MetricsServer } from "./metrics_server.ts";
export { joinFamilies, type MetricsSource, NodeMetrics } from "./node_metrics.ts";
export type { Registry } from "prom-client";
