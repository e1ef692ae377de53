/**
 * Serving a device until told to stop (a signal, or `dst up` stopping the node): over
 * DST (`--listen`/`--export`) and, when asked, over NBD and Prometheus metrics
 * (`--metrics`) too. `dst export` and `dst array` both end here, so they start, report
 * and stop the same way.
 */

import type { BlockDevice } from "../device/block_device.ts";
import { formatHostPort, type HostPort, isAllInterfaces, isLoopbackHost } from "../lib/address.ts";
import type { Logger } from "../lib/log.ts";
import { keepLogFields, logger } from "../lib/log.ts";
import { NbdServer } from "../nbd/mod.ts";
import { Exporter, type ExportOwner } from "../server/exporter.ts";
import { listenNbd, type NbdPort, NbdThreads } from "../server/nbd_threads.ts";
import { listenTcp } from "../transport/listen.ts";
import type { WriteGeneration } from "../server/write_generation.ts";
import { type WriteGrant, WriterLease } from "../server/writer_lease.ts";
import type { CommandHost } from "./command_host.ts";
import { SHUTDOWN_DEADLINE_MS } from "../constants.ts";
import { describeError } from "../lib/errors.ts";
import { protectionName } from "../server/handshake.ts";
import type { KeyRing, ServeKeys } from "./key_options.ts";
import type { AccessPolicy } from "../lib/allow_rules.ts";
import { MetricsServer, processRegistry, registerExport, type Registry } from "../metrics/mod.ts";
import type { RequestTiming } from "../server/export_connection.ts";

/** The lease identity of an export's own NBD port (DST identities are 32 hex digits). */
const NBD_PORT_CLIENT = "the export's NBD port";

export interface ServeOptions {
  /** DST listening address, or null to serve over NBD only. */
  listen: HostPort | null;
  nbd: HostPort | null;
  /**
   * When `device` is an image file that other threads may open too: its path and how
   * many threads serve NBD (nbd_threads.ts). Otherwise NBD is served by this thread.
   */
  nbdThreads?: { path: string; threads: number };
  generation: WriteGeneration;
  /** --shared-writers: no writer lease, every client may write. */
  sharedWriters: boolean;
  owner?: ExportOwner;
  /** What the startup lines call the device ("/dev/shm/a.img", "mirror of 2 legs"). */
  label: string;
  /** Printed after "dst CMD: serving LABEL" on the DST line (size, id...). */
  details: string;
  command: string;
  log: Logger;
  /** Who runs the command: when it stops, where its ready lines and metrics go. */
  host: CommandHost;
  /** --key and --protect: clients must prove a key; SIGHUP rereads the file. */
  keys?: ServeKeys;
  /** --allow: who may connect and do what (default: rw for all, admin from loopback). */
  policy?: AccessPolicy;
  /** --memory: payload memory shared by the DST clients. */
  memoryBytes?: number;
  /**
   * --metrics: where to serve Prometheus metrics. Absent, and with no registry from the
   * host, nothing is measured.
   */
  metricsListen?: HostPort;
  /** Adds what the device has to show beyond the export's counters (a mirror's legs). */
  registerMetrics?: (registry: Registry) => void;
}

/** The ports a device is served on, listened on before it is opened. */
export interface Ports {
  dst: Deno.TcpListener | null;
  nbd: NbdPort | null;
  /** --metrics: its server, already answering, and the registry it shows. */
  metrics: { server: MetricsServer; registry: Registry } | null;
}

/**
 * Listens on the DST, NBD and metrics addresses of `options`. `dst export` does this
 * before it opens its image, so a port that is taken fails before --create makes or
 * grows one.
 */
export function listenPorts(
  options: Pick<ServeOptions, "listen" | "nbd" | "nbdThreads" | "log" | "metricsListen">,
): Ports {
  const ports: Ports = { dst: null, nbd: null, metrics: null };
  try {
    if (options.nbd !== null) {
      ports.nbd = listenNbd(options.nbd, options.nbdThreads?.threads ?? 1, options.log);
    }
    if (options.listen !== null) ports.dst = listenTcp(options.listen, "--listen");
    if (options.metricsListen !== undefined) {
      const registry = processRegistry();
      ports.metrics = { server: MetricsServer.start(options.metricsListen, registry), registry };
    }
    return ports;
  } catch (error) {
    void closePorts(ports);
    throw error;
  }
}

/** Closes ports that no server took (a server closes its own when it shuts down). */
export async function closePorts(ports: Ports): Promise<void> {
  for (const listener of [ports.dst, ports.nbd?.listener]) {
    try {
      listener?.close();
    } catch {
      // already closed
    }
  }
  await ports.metrics?.server.shutdown().catch(() => {}); // already shut down, or never up
}

/**
 * Serves `device` until the host says stop (SIGINT/SIGTERM from the command line), then
 * finishes what is in flight: true when it did, false when the stop's deadline passed
 * first and requests may still be running on `device`. Closes nothing but `ports`
 * (listened on here when not given).
 */
export async function serveUntilStopped(
  device: BlockDevice,
  options: ServeOptions,
  ports: Ports = listenPorts(options),
): Promise<boolean> {
  let exporter: Exporter | null = null;
  let nbd: NbdServer | NbdThreads | null = null;
  let metrics: MetricsServer | null = null;
  // One lease for both ports: the NBD port is one more writer that DST clients must wait for.
  const lease = new WriterLease(options.generation, options.sharedWriters);
  try {
    if (ports.nbd !== null) nbd = await startNbd(device, ports.nbd, lease, options);
    const threads = nbd instanceof NbdThreads ? nbd : null;
    const stats = () => threads === null ? device.stats() : threads.stats();
    let timing: RequestTiming | undefined;
    // The host's registry (dst up's one /metrics for the node) or the command's own.
    const registry = options.host.metrics ?? ports.metrics?.registry;
    metrics = ports.metrics?.server ?? null;
    if (registry !== undefined) {
      // Read when scraped: the exporter is made below, and with NBD only there is none.
      timing = registerExport(registry, {
        stats,
        errors: () =>
          exporter?.errorCounts() ?? { device: stats().errors, protocol: 0, tampered: 0 },
        clients: () => exporter?.status().clients ?? 0,
        inFlight: () => exporter?.status().inFlight ?? 0,
      });
      options.registerMetrics?.(registry);
    }
    if (ports.dst !== null) {
      exporter = Exporter.serve(device, ports.dst, {
        log: options.log,
        lease,
        owner: options.owner,
        policy: options.policy,
        memoryBytes: options.memoryBytes,
        stats: threads === null ? undefined : () => threads.stats(),
        timing,
        ...(options.keys === undefined ? {} : {
          keys: { keys: () => options.keys!.ring.keys, protection: options.keys.protection },
        }),
      });
    }
  } catch (error) {
    await nbd?.shutdown();
    await closePorts(ports);
    throw error;
  }
  // Listening for signals before the ready line: a SIGTERM right after it is a clean stop.
  const stopping = options.host.untilStop();
  const print = (line: string) => options.host.print(`dst ${options.command}: ${line}`);
  if (metrics !== null) print(`metrics at ${metrics.url}`);
  // The address ends the line (scripts read it there); a wildcard is named before it.
  // Each goes to stdout, the command's output that scripts and `dst demo` read, and to
  // the log too, so the log tells the whole story in its own form.
  if (exporter !== null) {
    const address = formatHostPort(exporter.address);
    const line = `serving ${options.label} (${options.details})` +
      `${everywhere(exporter.address.hostname)} on ${address}`;
    print(line);
    options.log.info(line, { listen: address });
  }
  if (nbd !== null && ports.nbd !== null) {
    const line = `${exporter === null ? "serving" : "also serving"} ${options.label} ` +
      `as NBD${everywhere(ports.nbd.listener.addr.hostname)} at ${nbd.uri}`;
    print(line);
    options.log.info(line, { nbd: nbd.uri });
  }
  if (options.keys !== undefined && exporter !== null) {
    options.log.info(
      `clients must prove a key of ${options.keys.ring.path}: ${options.keys.ring.describe()}; ` +
        `records are ${protectionName(options.keys.protection)}; SIGHUP rereads the file`,
    );
  }
  if (exporter !== null && options.policy !== undefined && options.policy.rules.length > 0) {
    for (const line of options.policy.describe()) options.log.info(line);
  }
  warnIfOpen(options, exporter === null ? null : exporter.address);
  const stopReloading = options.keys !== undefined && exporter !== null
    ? reloadOnHangup(options.keys.ring, exporter, options.log)
    : () => {};
  options.host.ready();

  const signal = await stopping;
  stopReloading();
  options.log.info(`${signal}: no new clients; finishing what is in flight`);
  const stopped = Promise.all([exporter?.shutdown(), nbd?.shutdown(), metrics?.shutdown()])
    .then(() => true);
  let timer: ReturnType<typeof setTimeout> | undefined;
  const late = new Promise<false>((resolve) => {
    timer = setTimeout(() => resolve(false), SHUTDOWN_DEADLINE_MS);
  });
  try {
    if (!await Promise.race([stopped, late])) {
      stopped.catch(() => {}); // what it still does is abandoned with it
      options.log.error(
        `the stop did not finish within ${SHUTDOWN_DEADLINE_MS / 1000} s (a client that does ` +
          "not read its replies, or a final flush waiting for a device or leg that does not " +
          "answer): stopping without it; requests not answered were never acknowledged",
      );
      return false;
    }
    return true;
  } finally {
    clearTimeout(timer);
  }
}

/** ", all interfaces," for a wildcard host, so nobody takes 0.0.0.0 for this machine only. */
function everywhere(hostname: string): string {
  return isAllInterfaces(hostname) ? ", all interfaces," : "";
}

/**
 * NBD clients' writes take the writer lease and start a write generation too: to a
 * mirror that is "someone else wrote". All NBD connections of the port are one
 * writer together (nbdcopy opens several), so they share one identity.
 */
async function startNbd(
  device: BlockDevice,
  port: NbdPort,
  lease: WriterLease,
  options: ServeOptions,
): Promise<NbdServer | NbdThreads> {
  const description = `DST ${options.label}`;
  const address = { hostname: port.listener.addr.hostname, port: port.listener.addr.port };
  const claimant = { key: NBD_PORT_CLIENT, peer: `NBD clients of ${formatHostPort(address)}` };
  const acquire = (): Promise<WriteGrant> => lease.acquire(claimant);
  return options.nbdThreads !== undefined
    ? await NbdThreads.start({
      path: options.nbdThreads.path,
      device,
      port,
      description,
      acquire,
      log: options.log,
    })
    : NbdServer.serve(device, port.listener, {
      name: "",
      description,
      log: logger("nbd"),
      acquire,
    });
}

/**
 * DST has no keys yet: an export reachable beyond this machine can be read, written
 * and its lease taken by anyone who can reach it. Said once at start, so nobody
 * serves a disk to a network by accident.
 */
function warnIfOpen(options: ServeOptions, dst: HostPort | null): void {
  const open = [
    ...(dst !== null && options.keys === undefined && !isLoopbackHost(dst.hostname)
      ? [`${formatHostPort(dst)} (DST)`]
      : []),
    ...(options.nbd !== null && !isLoopbackHost(options.nbd.hostname)
      ? [`${formatHostPort(options.nbd)} (NBD)`]
      : []),
  ];
  if (open.length === 0) return;
  options.log.warn(
    `${open.join(" and ")} can be reached beyond this machine without a key: anyone who can ` +
      `reach it can read and write ${options.label}; give DST --key FILE (NBD has no keys: ` +
      "keep it on 127.0.0.1), or serve only on a network you trust",
  );
}

/**
 * SIGHUP rereads the key file: new keys work at once, and connections that proved a
 * removed key are closed (their clients reconnect, and must prove a key that is
 * still there). A file that became unreadable or unsafe keeps the old keys.
 */
function reloadOnHangup(ring: KeyRing, exporter: Exporter, log: Logger): () => void {
  const reload = async () => {
    try {
      const { added, removed } = await ring.reload();
      const closed = exporter.closeConnectionsOf(removed);
      log.info(
        `SIGHUP: reread ${ring.path}: ${ring.describe()}` +
          (added.length > 0 ? `; added ${added.map((key) => key.name).join(", ")}` : "") +
          (removed.length > 0
            ? `; removed ${removed.map((key) => key.name).join(", ")}, closing ${closed} ` +
              "connection(s) that used it"
            : ""),
      );
    } catch (error) {
      log.error(`SIGHUP: kept the old keys: ${describeError(error)}`);
    }
  };
  // Its lines name the item that dst up runs, as every other line of the export does.
  const listener = keepLogFields(() => void reload());
  Deno.addSignalListener("SIGHUP", listener);
  return () => Deno.removeSignalListener("SIGHUP", listener);
}
