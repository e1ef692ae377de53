/**
 * The DST exporter: serves one BlockDevice to many clients over the DST protocol.
 * It owns the listener and the set of connections; each connection owns its own
 * buffers and requests (export_connection.ts). The device is the caller's to open
 * and close.
 */

import { CLIENTS_PER_EXPORT_MAX, POOL_RETAINED_BYTES_MAX } from "../constants.ts";
import type { BlockDevice, DeviceStats } from "../device/block_device.ts";
import { formatHostPort, type HostPort } from "../lib/address.ts";
import { BufferPool } from "../lib/buffer_pool.ts";
import { type Clock, systemClock } from "../lib/clock.ts";
import { type Logger, logger } from "../lib/log.ts";
import { HelloStatus } from "../protocol/mod.ts";
import { AcceptLoop, clientSlots } from "../transport/accept_loop.ts";
import { listenTcp } from "../transport/listen.ts";
import { ExportConnection } from "./export_connection.ts";
import { acceptHandshake } from "./handshake.ts";
import { MemoryGeneration, type WriteGeneration } from "./write_generation.ts";

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
  writeGeneration: number;
  /** Present when the device is an array: its kind and members (src/array/). */
  array?: unknown;
}

export interface ExporterOptions {
  listen: HostPort;
  /** The device's counters for status (default device.stats(); more when other threads serve it too). */
  stats?: () => DeviceStats;
  /** The export's write generation (default: one in memory, for exports made in code). */
  generation?: WriteGeneration;
  /**
   * The STATUS document's `array` part and the CONTROL command's handler, when the
   * device is an array (the exporter itself knows nothing of arrays).
   */
  owner?: ExportOwner;
  clock?: Clock;
  log?: Logger;
}

/** What an array adds to its export: its own status, and runtime commands. */
export interface ExportOwner {
  status(): unknown;
  control(request: unknown): Promise<unknown>;
}

export class Exporter {
  readonly #pool = new BufferPool(POOL_RETAINED_BYTES_MAX);
  readonly #clock: Clock;
  readonly #log: Logger;
  readonly #startedMs: number;
  readonly #loop: AcceptLoop;
  readonly #generation: WriteGeneration;
  readonly #owner: ExportOwner | null;
  readonly #stats: () => DeviceStats;
  #protocolErrors = 0;

  private constructor(
    readonly device: BlockDevice,
    readonly listener: Deno.TcpListener,
    options: ExporterOptions,
  ) {
    this.#clock = options.clock ?? systemClock;
    this.#log = options.log ?? logger("export");
    this.#startedMs = this.#clock.nowMs();
    this.#generation = options.generation ?? new MemoryGeneration();
    this.#owner = options.owner ?? null;
    this.#stats = options.stats ?? (() => device.stats());
    this.#loop = new AcceptLoop(
      listener,
      clientSlots(CLIENTS_PER_EXPORT_MAX),
      (conn, peer, admitted) => this.#session(conn, peer, admitted),
      this.#log,
    );
  }

  /** Starts listening; throws a clear error when the address cannot be bound. */
  static start(device: BlockDevice, options: ExporterOptions): Exporter {
    return new Exporter(device, listenTcp(options.listen, "--listen"), options);
  }

  get address(): HostPort {
    const addr = this.listener.addr;
    return { hostname: addr.hostname, port: addr.port };
  }

  /**
   * The export's status. Asked over the wire, the asking connection and its STATUS
   * request are left out (`askedByClient`), so an idle export shows 0 clients, 0 in flight.
   */
  status(askedByClient = false): ExportStatus {
    const info = this.device.info;
    const stats = this.#stats();
    return {
      kind: "export",
      name: info.name,
      listen: formatHostPort(this.address),
      sizeBytes: info.sizeBytes,
      blockSize: info.blockSize,
      readOnly: info.readOnly,
      exportId: info.id,
      clients: this.#loop.clients - (askedByClient ? 1 : 0),
      inFlight: this.#loop.inFlight - (askedByClient ? 1 : 0),
      uptimeMs: Math.round(this.#clock.nowMs() - this.#startedMs),
      reads: stats.reads,
      readBytes: stats.readBytes,
      writes: stats.writes,
      writtenBytes: stats.writtenBytes,
      flushes: stats.flushes,
      discards: stats.discards,
      zeroes: stats.zeroes,
      errors: stats.errors + this.#protocolErrors,
      writeGeneration: this.#generation.current,
      ...(this.#owner === null ? {} : { array: this.#owner.status() }),
    };
  }

  /**
   * Stops accepting, lets every connection finish and answer what it has in flight,
   * then flushes the device. The device stays open (the caller closes it).
   */
  async shutdown(): Promise<void> {
    await this.#loop.shutdown();
    if (!this.device.info.readOnly) await this.device.flush();
  }

  async #session(
    conn: Deno.Conn,
    peer: string,
    admitted: boolean,
  ): Promise<ExportConnection | null> {
    const readOnly = this.device.info.readOnly;
    let generationStarted = readOnly;
    const refusal = await acceptHandshake(
      conn,
      this.device.info,
      () => admitted ? HelloStatus.OK : HelloStatus.BUSY,
      async (writer) => {
        if (!writer || readOnly) return this.#generation.current;
        generationStarted = true;
        return await this.#generation.next();
      },
    );
    if (refusal !== null) {
      this.#protocolErrors += 1;
      this.#log.warn(`${peer}: handshake refused: ${refusal}`);
      return null;
    }
    return new ExportConnection(conn, peer, {
      device: this.device,
      pool: this.#pool,
      log: this.#log,
      statusJson: () => new TextEncoder().encode(JSON.stringify(this.status(true))),
      countError: () => {
        this.#protocolErrors += 1;
      },
      // A client that writes without having said so still starts a generation, first.
      startWriting: generationStarted ? null : () => this.#generation.next().then(() => {}),
      control: this.#owner === null ? null : (request) => this.#owner!.control(request),
    });
  }
}
