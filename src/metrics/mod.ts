/** `--metrics`: Prometheus metrics over HTTP (registry.ts: what is shown; metrics_server.ts: serving it). */

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
export type { Registry } from "prom-client";
