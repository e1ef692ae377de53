/**
 * The HTTP server of `--metrics [HOST]:PORT`: answers `GET /metrics` with the registry
 * in Prometheus's text format, and nothing else. It owns its listener; the metrics
 * themselves are the registry's (registry.ts), or a node's (node_metrics.ts).
 */

import type { MetricsSource } from "./node_metrics.ts";
import { formatHostPort, type HostPort } from "../lib/address.ts";
import { describeError, DstError } from "../lib/errors.ts";

/** The one path served; anything else is a 404 that names it. */
export const METRICS_PATH = "/metrics";

export class MetricsServer {
  private constructor(readonly server: Deno.HttpServer<Deno.NetAddr>) {}

  /** Listens on `address` (port 0 picks a free one); throws a clear error when it cannot bind. */
  static start(address: HostPort, registry: MetricsSource): MetricsServer {
    try {
      return new MetricsServer(Deno.serve({
        hostname: address.hostname,
        port: address.port,
        onListen: () => {}, // the caller prints the address, in its own words
      }, (request) => answer(request, registry)));
    } catch (error) {
      throw new DstError(
        "LISTEN",
        `Cannot listen on ${formatHostPort(address)}: ${describeError(error)}` +
          " (is another server using that port? pick another with --metrics)",
      );
    }
  }

  get address(): HostPort {
    const addr = this.server.addr;
    return { hostname: addr.hostname, port: addr.port };
  }

  /** Where to scrape, e.g. http://127.0.0.1:9100/metrics. */
  get url(): string {
    return `http://${formatHostPort(this.address)}${METRICS_PATH}`;
  }

  /** Stops listening; a scrape under way is answered first. */
  async shutdown(): Promise<void> {
    await this.server.shutdown();
  }
}

async function answer(request: Request, registry: MetricsSource): Promise<Response> {
  const path = new URL(request.url).pathname;
  if (path !== METRICS_PATH) {
    return new Response(`Not found: the metrics are at ${METRICS_PATH}\n`, { status: 404 });
  }
  if (request.method !== "GET" && request.method !== "HEAD") {
    return new Response("Only GET\n", { status: 405, headers: { allow: "GET, HEAD" } });
  }
  return new Response(request.method === "HEAD" ? null : await registry.metrics(), {
    headers: { "content-type": registry.contentType },
  });
}
