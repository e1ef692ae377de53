/**
 * The DST exporter: serves one BlockDevice to many clients over the DST protocol.
 * It owns the listener and the set of connections; each connection owns its own
 * buffers and requests (export_connection.ts). The device is the caller's to open
 * and close.
 *
 * It also keeps the promise that an acknowledged write stays written when clients
 * reconnect (protocol README, "Fencing" and "Writer lease"):
 * 1. Before it answers a client's new connection, every older connection of the same
 *    client identity is fenced: closed, its undispatched frames dropped, its
 *    dispatched requests finished. Handshakes of one identity run one at a time.
 * 2. A client writes only with a grant of the writer lease (writer_lease.ts), and a
 *    holder whose connections went silent for LEASE_IDLE_MS is fenced, which frees it.
 */

import {
  ADDRESS_REFUSAL_LOG_MS,
  CLIENTS_PER_EXPORT_MAX,
  CONNECTION_IDLE_MS,
  HANDSHAKE_TIMEOUT_MS,
  LEASE_IDLE_CHECK_MS,
  LEASE_IDLE_MS,
  MEMORY_BUDGET_BYTES_DEFAULT,
  POOL_RETAINED_BYTES_MAX,
} from "../constants.ts";
import type { BlockDevice, DeviceStats } from "../device/block_device.ts";
import { formatHostPort, type HostPort } from "../lib/address.ts";
import { BufferPool } from "../lib/buffer_pool.ts";
import { type Clock, systemClock, type Timer } from "../lib/clock.ts";
import { type Logger, logger } from "../lib/log.ts";
import { bytesToHex, randomId } from "../lib/hex.ts";
import type { Key } from "../lib/key_file.ts";
import { type Access, AccessPolicy } from "../lib/allow_rules.ts";
import {
  ClientFeature,
  type ClientHello,
  HelloStatus,
  PROTECTION_ENCRYPT,
  ServerFeature,
} from "../protocol/mod.ts";
import {
  type AcceptedConn,
  AcceptLoop,
  clientSlots,
  type ConnListener,
  remoteAddress,
} from "../transport/accept_loop.ts";
import { listenTcp } from "../transport/listen.ts";
import { MemoryBudget } from "../transport/memory_budget.ts";
import { ExportConnection, type RequestTiming } from "./export_connection.ts";
import { acceptHandshake, type Admission, type ExportKeys, refuse } from "./handshake.ts";
import { MemoryGeneration } from "./write_generation.ts";
import {
  LeaseHeldError,
  type LeaseHolderStatus,
  type WriteGrant,
  WriterLease,
} from "./writer_lease.ts";

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
  /** Records that failed their check (keyed exports): tampering, or a broken link. */
  tampered: number;
  /** "encrypt", "mac", or "none" (no key: anyone who reaches the port is served). */
  protection: string;
  /** The payload memory budget (--memory), what of it is spent now, and the most ever spent. */
  memory: { limitBytes: number; usedBytes: number; peakBytes: number };
  writeGeneration: number;
  /** The export state's epoch (32 hex digits): generations count within one epoch. */
  writeEpoch: string;
  /** Who may write now; null when nobody holds the lease (or writers are shared). */
  writeLease: LeaseHolderStatus | null;
  sharedWriters: boolean;
  /** Present when the device is an array: its kind and members (src/array/). */
  array?: unknown;
}

export interface ExporterOptions {
  listen: HostPort;
  /** The device's counters for status (default device.stats(); more when other threads serve it too). */
  stats?: () => DeviceStats;
  /**
   * The writer lease and write generation, shared with the export's NBD port (default:
   * one writer at a time, generation in memory, for exports made in code).
   */
  lease?: WriterLease;
  /**
   * The STATUS document's `array` part and the CONTROL command's handler, when the
   * device is an array (the exporter itself knows nothing of arrays).
   */
  owner?: ExportOwner;
  /** Who may do what (--allow); default: rw for all, admin from loopback. */
  policy?: AccessPolicy;
  /** Payload memory shared by all clients (--memory; default MEMORY_BUDGET_BYTES_DEFAULT). */
  memoryBytes?: number;
  /** Keys and protection (protocol version 2); absent: version 1, no keys. */
  keys?: ExportKeySettings;
  /** Where the DST port's request times go (--metrics); absent: they are not measured. */
  timing?: RequestTiming;
  /** How long a silent lease holder keeps the lease (default LEASE_IDLE_MS; shorter in tests). */
  leaseIdleMs?: number;
  /** How long an idle connection stays open (default CONNECTION_IDLE_MS; shorter in tests). */
  connectionIdleMs?: number;
  clock?: Clock;
  log?: Logger;
}

/** A keyed export's settings: the keys as they are now, and the protection. */
export interface ExportKeySettings {
  keys(): readonly Key[];
  protection: number;
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
  readonly #lease: WriterLease;
  readonly #owner: ExportOwner | null;
  readonly #stats: () => DeviceStats;
  readonly #timing: RequestTiming | undefined;
  /** Each client identity's connections, oldest first. */
  readonly #clients = new Map<string, Set<ExportConnection>>();
  /** The tail of each identity's queue of handshakes (they run one at a time). */
  readonly #handshakes = new Map<string, Promise<void>>();
  readonly #silenceCheck: Timer;
  readonly #leaseIdleMs: number;
  readonly #connectionIdleMs: number;
  /** Random per Exporter, so per start of the export: clients see a restart in it. */
  readonly #instance = randomId();
  #anonymous = 0;
  #protocolErrors = 0;
  #tampered = 0;
  #tamperLoggedMs = -Infinity;
  readonly #keys: ExportKeys | null;
  readonly #policy: AccessPolicy;
  readonly #budget: MemoryBudget;
  #deniedLoggedMs = -Infinity;
  #deniedUnlogged = 0;
  /** The key each keyed connection proved, for closing them when it is removed. */
  readonly #connectionKeys = new Map<ExportConnection, Key>();

  private constructor(
    readonly device: BlockDevice,
    readonly listener: ConnListener,
    options: Omit<ExporterOptions, "listen">,
  ) {
    this.#clock = options.clock ?? systemClock;
    this.#log = options.log ?? logger("export");
    this.#startedMs = this.#clock.nowMs();
    this.#lease = options.lease ?? new WriterLease(new MemoryGeneration(), false, this.#clock);
    this.#owner = options.owner ?? null;
    this.#stats = options.stats ?? (() => device.stats());
    this.#timing = options.timing;
    this.#loop = new AcceptLoop(
      listener,
      clientSlots(CLIENTS_PER_EXPORT_MAX),
      (conn, peer, admitted) => this.#session(conn, peer, admitted),
      this.#log,
      this.#clock,
    );
    this.#leaseIdleMs = options.leaseIdleMs ?? LEASE_IDLE_MS;
    this.#policy = options.policy ?? new AccessPolicy([]);
    this.#budget = new MemoryBudget(options.memoryBytes ?? MEMORY_BUDGET_BYTES_DEFAULT);
    const keySettings = options.keys;
    this.#keys = keySettings === undefined ? null : {
      keys: () => keySettings.keys(),
      protection: keySettings.protection,
      onTampered: (peer, message) => this.#countTampered(peer, message),
    };
    this.#connectionIdleMs = options.connectionIdleMs ?? CONNECTION_IDLE_MS;
    this.#silenceCheck = this.#clock.every(
      Math.min(LEASE_IDLE_CHECK_MS, this.#leaseIdleMs / 4),
      () => this.#fenceSilentHolders(),
    );
  }

  /** Starts listening; throws a clear error when the address cannot be bound. */
  static start(device: BlockDevice, options: ExporterOptions): Exporter {
    return new Exporter(device, listenTcp(options.listen, "--listen"), options);
  }

  /** Serves on a listener made elsewhere (the simulation's network, say). */
  static serve(
    device: BlockDevice,
    listener: ConnListener,
    options: Omit<ExporterOptions, "listen">,
  ): Exporter {
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
      tampered: this.#tampered,
      protection: this.#keys === null ? "none" : protectionWord(this.#keys.protection),
      memory: {
        limitBytes: this.#budget.limitBytes,
        usedBytes: this.#budget.usedBytes,
        peakBytes: this.#budget.peakBytes,
      },
      writeGeneration: this.#lease.generation.current,
      writeEpoch: this.#lease.generation.epoch,
      writeLease: this.#lease.holder,
      sharedWriters: this.#lease.sharedWriters,
      ...(this.#owner === null ? {} : { array: this.#owner.status() }),
    };
  }

  /**
   * The export's errors by kind, for the metrics: a device call that failed, a request
   * or handshake refused or a frame that broke the protocol, a record that failed its
   * check. status() shows the first two summed as `errors`.
   */
  errorCounts(): { device: number; protocol: number; tampered: number } {
    return {
      device: this.#stats().errors,
      protocol: this.#protocolErrors,
      tampered: this.#tampered,
    };
  }

  /**
   * Stops accepting, lets every connection finish and answer what it has in flight,
   * then flushes the device. The device stays open (the caller closes it).
   */
  async shutdown(): Promise<void> {
    this.#silenceCheck.cancel();
    await this.#loop.shutdown();
    if (!this.device.info.readOnly) await this.device.flush();
  }

  async #session(
    conn: AcceptedConn,
    peer: string,
    admitted: boolean,
  ): Promise<ExportConnection | null> {
    const readOnly = this.device.info.readOnly;
    let key = "";
    let grant: WriteGrant | null = null;
    let unlock: (() => void) | null = null;
    const ip = remoteAddress(conn);
    let access = "rw" as Access; // set by the admission below
    try {
      const denied = this.#policy.addressMayConnect(ip)
        ? undefined
        : `no --allow rule of this export lets ${ip} in`;
      const handshake = await acceptHandshake(conn, this.device.info, async (hello, proved) => {
        if (!admitted) return refuse(HelloStatus.BUSY);
        const decided = this.#policy.decide(ip, proved?.name ?? null);
        if (decided === null) {
          return {
            ok: false,
            status: HelloStatus.ACCESS_DENIED,
            reason: `no --allow rule of this export lets ${ip}` +
              (proved === null ? "" : ` with key "${proved.name}"`) + " in",
          };
        }
        access = decided;
        key = this.#clientKey(hello, proved);
        const helloMs = this.#clock.nowMs();
        unlock = await this.#handshakeTurn(key);
        await this.#fenceOlder(key, peer);
        // The client gives up a handshake after HANDSHAKE_TIMEOUT_MS: past that, nobody
        // will use a grant, and the slot is better freed.
        if (this.#clock.nowMs() - helloMs > HANDSHAKE_TIMEOUT_MS) {
          return { ok: false, status: HelloStatus.BUSY, reason: "fencing took too long; retry" };
        }
        if ((hello.features & ClientFeature.WRITER) !== 0 && !readOnly && access !== "ro") {
          try {
            grant = await this.#lease.acquire({ key, peer });
          } catch (error) {
            if (!(error instanceof LeaseHeldError)) throw error;
            return { ok: false, status: HelloStatus.WRITE_LEASE_HELD, reason: error.message };
          }
        }
        return { ...this.#admitted(grant), readOnly: access === "ro" };
      }, { peer, keys: this.#keys, clock: this.#clock, denied });
      if (!handshake.ok) {
        this.#protocolErrors += 1;
        if (denied === undefined) this.#log.warn(`${peer}: handshake refused: ${handshake.reason}`);
        else this.#logDenied(peer, denied);
        return null;
      }
      const connection: ExportConnection = new ExportConnection(handshake.conn, peer, {
        device: this.device,
        pool: this.#pool,
        log: this.#log,
        clock: this.#clock,
        idleMs: this.#connectionIdleMs,
        statusJson: () => new TextEncoder().encode(JSON.stringify(this.status(true))),
        countError: () => {
          this.#protocolErrors += 1;
        },
        // A client that writes without having said so asks for the lease then.
        acquire: readOnly || access === "ro" ? null : () => this.#lease.acquire({ key, peer }),
        access,
        budget: this.#budget,
        grant,
        ended: (ended) => {
          this.#forget(key, ended);
          this.#connectionKeys.delete(ended);
        },
        control: this.#owner === null ? null : (request) => this.#owner!.control(request),
        timing: this.#timing,
      });
      if (handshake.key !== null) this.#connectionKeys.set(connection, handshake.key);
      let connections = this.#clients.get(key);
      if (connections === undefined) this.#clients.set(key, connections = new Set());
      connections.add(connection);
      // A SIGHUP during the handshake (its proofs, fencing) may have removed the key
      // after it was looked up: such a connection is closed like the others of that key.
      if (handshake.key !== null && this.#keys !== null) {
        const proved = handshake.key;
        const current = this.#keys.keys().some((k) =>
          k.name === proved.name && k.fingerprint === proved.fingerprint
        );
        if (!current) this.closeConnectionsOf([proved]);
      }
      return connection;
    } catch (error) {
      (grant as WriteGrant | null)?.release();
      throw error;
    } finally {
      (unlock as (() => void) | null)?.();
    }
  }

  /**
   * Closes every connection that proved one of `keys` (removed from the key file);
   * returns how many. Each is fenced: what it started finishes, the rest is dropped,
   * and its client reconnects with a key that is still there, or not at all.
   */
  closeConnectionsOf(keys: readonly Key[]): number {
    let closed = 0;
    for (const [connection, key] of this.#connectionKeys) {
      if (!keys.some((gone) => gone.name === key.name && gone.fingerprint === key.fingerprint)) {
        continue;
      }
      this.#log.info(`${connection.peer}: key "${key.name}" was removed; closing its connection`);
      void connection.fence();
      closed += 1;
    }
    return closed;
  }

  /** Addresses the rules keep out are logged once per ADDRESS_REFUSAL_LOG_MS: a scan stays one line. */
  #logDenied(peer: string, reason: string): void {
    const nowMs = this.#clock.nowMs();
    if (nowMs - this.#deniedLoggedMs < ADDRESS_REFUSAL_LOG_MS) {
      this.#deniedUnlogged += 1;
      return;
    }
    const more = this.#deniedUnlogged > 0 ? ` (and ${this.#deniedUnlogged} more since)` : "";
    this.#deniedLoggedMs = nowMs;
    this.#deniedUnlogged = 0;
    this.#log.warn(`${peer}: refused: ${reason}${more}`);
  }

  /** One warning per ADDRESS_REFUSAL_LOG_MS, so a flood of tampering stays one screen. */
  #countTampered(peer: string, message: string): void {
    this.#tampered += 1;
    const nowMs = this.#clock.nowMs();
    if (nowMs - this.#tamperLoggedMs < ADDRESS_REFUSAL_LOG_MS) return;
    this.#tamperLoggedMs = nowMs;
    this.#log.warn(`${peer}: ${message} (${this.#tampered} so far; see \`dst status\`)`);
  }

  #admitted(grant: WriteGrant | null): Admission {
    return {
      ok: true,
      features: this.#lease.sharedWriters ? ServerFeature.SHARED_WRITERS : 0,
      writeGeneration: grant?.generation ?? this.#lease.generation.current,
      writeEpoch: this.#lease.generation.epoch,
      exportInstance: this.#instance,
    };
  }

  /**
   * A client's identity; an all-zero one is anonymous, each of its connections a client
   * of its own. On a keyed export it is bound to the key proved: the client id travels
   * in the clear (and STATUS shows the lease holder's), so another key's holder could
   * otherwise present it, fence the writer and carry on its lease unseen.
   */
  #clientKey(hello: ClientHello, proved: Key | null): string {
    if (hello.clientId.every((byte) => byte === 0)) return `anonymous-${++this.#anonymous}`;
    const id = bytesToHex(hello.clientId);
    return proved === null ? id : `${id}-${proved.name}-${proved.fingerprint}`;
  }

  /** Waits for the identity's earlier handshakes; call the result once this one is done. */
  async #handshakeTurn(key: string): Promise<() => void> {
    const previous = this.#handshakes.get(key) ?? Promise.resolve();
    const done = Promise.withResolvers<void>();
    const tail = previous.then(() => done.promise);
    this.#handshakes.set(key, tail);
    await previous;
    return () => {
      done.resolve();
      if (this.#handshakes.get(key) === tail) this.#handshakes.delete(key);
    };
  }

  /** Fences every connection `key` has, before its new one from `peer` is answered. */
  async #fenceOlder(key: string, peer: string): Promise<void> {
    const older = this.#clients.get(key);
    if (older === undefined || older.size === 0) return;
    this.#log.info(
      `${peer}: client ${key.slice(0, 8)} reconnected; fencing its ${older.size} older ` +
        `connection(s) first`,
    );
    await Promise.all([...older].map((connection) => connection.fence()));
    for (const connection of older) this.#forget(key, connection);
  }

  #forget(key: string, connection: ExportConnection): void {
    const connections = this.#clients.get(key);
    if (connections === undefined) return;
    connections.delete(connection);
    if (connections.size === 0) this.#clients.delete(key);
  }

  /**
   * A lease holder that vanished without closing (its node lost power, or sits behind
   * a partition) would keep every other writer out: when its connections have sent
   * nothing for leaseIdleMs (live clients ping far more often), they are fenced,
   * which frees the lease. Its late bytes then find the connection closed.
   */
  #fenceSilentHolders(): void {
    if (this.#lease.sharedWriters) return;
    for (const [key, connections] of this.#clients) {
      if (!this.#lease.heldBy(key)) continue;
      for (const connection of connections) {
        if (!connection.holdsGrant || connection.silentMs() < this.#leaseIdleMs) continue;
        const seconds = Math.round(connection.silentMs() / 1000);
        this.#log.warn(
          `${connection.peer}: the write lease holder sent nothing for ${seconds} s; fencing ` +
            `its connection (the lease frees once what it started has finished)`,
        );
        // Still listed until it has ended: a reconnect of the same client must wait for
        // what this connection started (fence() may run twice).
        void connection.fence();
      }
    }
  }
}

function protectionWord(protection: number): string {
  return protection === PROTECTION_ENCRYPT ? "encrypt" : "mac";
}
