/**
 * The DST exporter: serves one BlockDevice to many clients over the DST protocol.
 * It owns the listener and the set of connections; each connection owns its own
 * buffers and requests (export_connection.ts). The device is the caller's to open
 * and close.
 */

import { CLIENTS_PER_EXPORT_MAX, PAYLOAD_BYTES_MAX } from "../constants.ts";
import type { BlockDevice } from "../device/block_device.ts";
import { formatHostPort, type HostPort } from "../lib/address.ts";
import { BufferPool } from "../lib/buffer_pool.ts";
import { type Clock, systemClock } from "../lib/clock.ts";
import { describeError } from "../lib/errors.ts";
import { type Logger, logger } from "../lib/log.ts";
import { HelloStatus } from "../protocol/mod.ts";
import { closeQuietly } from "../transport/byte_conn.ts";
import { ExportConnection } from "./export_connection.ts";
import { acceptHandshake } from "./handshake.ts";

/** What `dst status` shows of an export; the STATUS reply is this as JSON. */
export interface ExportStatus {
  kind: "export";
  name: string;
  listen: string;
  sizeBytes: number;
  blockSize: number;
  readOnly: boolean;
  exportId: string;
  clients: number;
  inFlight: number;
  uptimeMs: number;
  reads: number;
  readBytes: number;
  writes: number;
  writtenBytes: number;
  flushes: number;
  discards: number;
  zeroes: number;
  errors: number;
}

export interface ExporterOptions {
  listen: HostPort;
  clock?: Clock;
  log?: Logger;
}

export class Exporter {
  readonly #connections = new Set<ExportConnection>();
  readonly #serving = new Set<Promise<void>>();
  readonly #pool = new BufferPool(4 * PAYLOAD_BYTES_MAX);
  readonly #clock: Clock;
  readonly #log: Logger;
  readonly #startedMs: number;
  readonly #acceptLoop: Promise<void>;
  #protocolErrors = 0;
  /** Connections from accept to close, handshaking ones included, so the client limit has no race. */
  #clientsAdmitted = 0;
  #stopping = false;

  private constructor(
    readonly device: BlockDevice,
    readonly listener: Deno.TcpListener,
    options: ExporterOptions,
  ) {
    this.#clock = options.clock ?? systemClock;
    this.#log = options.log ?? logger("export");
    this.#startedMs = this.#clock.nowMs();
    this.#acceptLoop = this.#accept();
  }

  /** Starts listening; throws a clear error when the address cannot be bound. */
  static start(device: BlockDevice, options: ExporterOptions): Exporter {
    let listener: Deno.TcpListener;
    try {
      listener = Deno.listen({ hostname: options.listen.hostname, port: options.listen.port });
    } catch (error) {
      throw new Error(
        `Cannot listen on ${formatHostPort(options.listen)}: ${describeError(error)}` +
          " (is another export using that port? pick another with --listen)",
      );
    }
    return new Exporter(device, listener, options);
  }

  get address(): HostPort {
    const addr = this.listener.addr as Deno.NetAddr;
    return { hostname: addr.hostname, port: addr.port };
  }

  /**
   * The export's status. Asked over the wire, the asking connection and its STATUS
   * request are left out (`askedByClient`), so an idle export shows 0 clients, 0 in flight.
   */
  status(askedByClient = false): ExportStatus {
    const info = this.device.info;
    const stats = this.device.stats();
    let inFlight = 0;
    for (const connection of this.#connections) inFlight += connection.inFlight;
    return {
      kind: "export",
      name: info.name,
      listen: formatHostPort(this.address),
      sizeBytes: info.sizeBytes,
      blockSize: info.blockSize,
      readOnly: info.readOnly,
      exportId: info.id,
      clients: this.#connections.size - (askedByClient ? 1 : 0),
      inFlight: inFlight - (askedByClient ? 1 : 0),
      uptimeMs: Math.round(this.#clock.nowMs() - this.#startedMs),
      reads: stats.reads,
      readBytes: stats.readBytes,
      writes: stats.writes,
      writtenBytes: stats.writtenBytes,
      flushes: stats.flushes,
      discards: stats.discards,
      zeroes: stats.zeroes,
      errors: stats.errors + this.#protocolErrors,
    };
  }

  /**
   * Stops accepting, lets every connection finish and answer what it has in flight,
   * then flushes the device. The device stays open (the caller closes it).
   */
  async shutdown(): Promise<void> {
    if (this.#stopping) return;
    this.#stopping = true;
    closeQuietly(this.listener);
    await this.#acceptLoop;
    await Promise.all([...this.#connections].map((connection) => connection.stop()));
    await Promise.all(this.#serving);
    if (!this.device.info.readOnly) await this.device.flush();
  }

  async #accept(): Promise<void> {
    for (;;) {
      let conn: Deno.TcpConn;
      try {
        conn = await this.listener.accept();
      } catch (error) {
        if (!this.#stopping) {
          this.#log.error(`accept failed, no longer listening: ${describeError(error)}`);
        }
        return;
      }
      if (this.#stopping) {
        closeQuietly(conn);
        return;
      }
      const serving = this.#serveClient(conn);
      this.#serving.add(serving);
      void serving.finally(() => this.#serving.delete(serving));
    }
  }

  async #serveClient(conn: Deno.TcpConn): Promise<void> {
    const remote = conn.remoteAddr as Deno.NetAddr;
    const peer = formatHostPort({ hostname: remote.hostname, port: remote.port });
    this.#clientsAdmitted += 1;
    try {
      await this.#handshakeAndServe(conn, peer);
    } finally {
      this.#clientsAdmitted -= 1;
    }
  }

  async #handshakeAndServe(conn: Deno.TcpConn, peer: string): Promise<void> {
    try {
      conn.setNoDelay(true);
      const admit = () =>
        this.#clientsAdmitted > CLIENTS_PER_EXPORT_MAX ? HelloStatus.BUSY : HelloStatus.OK;
      const refusal = await acceptHandshake(conn, this.device.info, admit);
      if (refusal !== null) {
        this.#protocolErrors += 1;
        this.#log.warn(`${peer}: handshake refused: ${refusal}`);
        closeQuietly(conn);
        return;
      }
    } catch (error) {
      this.#log.warn(`${peer}: handshake failed: ${describeError(error)}`);
      closeQuietly(conn);
      return;
    }
    const connection = new ExportConnection(conn, peer, {
      device: this.device,
      pool: this.#pool,
      log: this.#log,
      statusJson: () => new TextEncoder().encode(JSON.stringify(this.status(true))),
      countError: () => {
        this.#protocolErrors += 1;
      },
    });
    this.#connections.add(connection);
    this.#log.info(`${peer}: client connected (${this.#connections.size} now)`);
    try {
      await connection.serve();
    } finally {
      this.#connections.delete(connection);
      this.#log.info(`${peer}: client left (${this.#connections.size} now)`);
    }
  }
}
