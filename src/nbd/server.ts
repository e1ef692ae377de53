/**
 * An NBD server of any BlockDevice, on TCP or a Unix socket. `dst attach` serves a
 * remote DST export with it, and `dst export --nbd` a local image; arrays will too.
 *
 * CAN_MULTI_CONN is advertised because it is true: every connection of one server
 * goes to the same BlockDevice, so a flush on any connection covers writes completed
 * on all of them. FAST_ZERO is not: zeroing here is not faster than writing.
 */

import { CLIENTS_PER_EXPORT_MAX, POOL_RETAINED_BYTES_MAX } from "../constants.ts";
import type { BlockDevice } from "../device/block_device.ts";
import { formatHostPort, type HostPort } from "../lib/address.ts";
import { BufferPool } from "../lib/buffer_pool.ts";
import { type Logger, logger } from "../lib/log.ts";
import {
  type AcceptedConn,
  AcceptLoop,
  type ClientSlots,
  clientSlots,
} from "../transport/accept_loop.ts";
import { listenTcp, listenUnix } from "../transport/listen.ts";
import type { WriteGrant } from "../server/writer_lease.ts";
import { type NbdExport, negotiate } from "./handshake.ts";
import { NbdConnection } from "./transmission.ts";
import { TransmissionFlag } from "./wire.ts";
import { plural } from "../lib/plural.ts";

export type NbdListen = { tcp: HostPort } | { unix: string };

export interface NbdServerOptions {
  listen: NbdListen;
  /** The export name clients may ask for (besides ""). */
  name: string;
  description: string;
  log?: Logger;
  /**
   * Asks for a write grant of the export's writer lease (which starts a write
   * generation); each connection calls it before its first write and releases it when
   * it ends. Absent: this server keeps no lease (an attach serves a remote device).
   */
  acquire?: () => Promise<WriteGrant>;
  /** The client limit, when several servers (threads) share one (default: 64 of its own). */
  clientSlots?: ClientSlots;
  /** Free buffers kept for reuse (default 4 of the largest request), split when threads share. */
  retainedBytesMax?: number;
}

export class NbdServer {
  readonly #loop: AcceptLoop;
  readonly #pool: BufferPool;
  readonly #log: Logger;
  readonly #exported: NbdExport;

  private constructor(
    readonly device: BlockDevice,
    readonly listener: Deno.Listener,
    readonly options: Omit<NbdServerOptions, "listen">,
  ) {
    this.#log = options.log ?? logger("nbd");
    this.#pool = new BufferPool(options.retainedBytesMax ?? POOL_RETAINED_BYTES_MAX);
    this.#exported = {
      name: options.name,
      description: options.description,
      sizeBytes: device.info.sizeBytes,
      transmissionFlags: transmissionFlags(device),
    };
    this.#loop = new AcceptLoop(
      listener,
      options.clientSlots ?? clientSlots(CLIENTS_PER_EXPORT_MAX),
      (conn, peer, admitted) => this.#session(conn, peer, admitted),
      this.#log,
    );
  }

  static async start(device: BlockDevice, options: NbdServerOptions): Promise<NbdServer> {
    const listener = "tcp" in options.listen
      ? listenTcp(options.listen.tcp, "--nbd or --listen")
      : await listenUnix(options.listen.unix);
    return NbdServer.serve(device, listener, options);
  }

  /** Serves on a listener opened by the caller (nbd_threads.ts opens one per thread). */
  static serve(
    device: BlockDevice,
    listener: Deno.Listener,
    options: Omit<NbdServerOptions, "listen">,
  ): NbdServer {
    return new NbdServer(device, listener, options);
  }

  /** The URI NBD clients (nbdinfo, nbdcopy, qemu) take, e.g. nbd://127.0.0.1:10809 or nbd+unix:///?socket=... */
  get uri(): string {
    const name = encodeURIComponent(this.options.name);
    const addr = this.listener.addr;
    if (addr.transport === "unix") return `nbd+unix:///${name}?socket=${addr.path}`;
    const { hostname, port } = addr as Deno.NetAddr;
    const host = hostname === "0.0.0.0" || hostname === "::" ? "localhost" : hostname;
    return `nbd://${formatHostPort({ hostname: host, port })}/${name}`;
  }

  /** Stops accepting and lets every client's requests in flight finish. The device stays open. */
  async shutdown(): Promise<void> {
    await this.#loop.shutdown();
    if (this.listener.addr.transport === "unix") {
      await Deno.remove(this.listener.addr.path).catch(() => {});
    }
  }

  async #session(
    conn: AcceptedConn,
    peer: string,
    admitted: boolean,
  ): Promise<NbdConnection | null> {
    if (!admitted) {
      this.#log.warn(
        `${peer}: NBD client refused: ${plural(this.#loop.slots.max, "client")} already`,
      );
      return null;
    }
    const negotiated = await negotiate(conn, this.#exported, peer, this.#log);
    if (negotiated === null) return null;
    return new NbdConnection(conn, peer, {
      device: this.device,
      pool: this.#pool,
      log: this.#log,
      structuredReplies: negotiated.structuredReplies,
      acquire: this.device.info.readOnly ? null : this.options.acquire ?? null,
    });
  }
}

/** The transmission flags an export of `device` advertises: what this server does for it. */
export function transmissionFlags(device: BlockDevice): number {
  const F = TransmissionFlag;
  const always = F.HAS_FLAGS | F.SEND_FLUSH | F.CAN_MULTI_CONN;
  if (device.info.readOnly) return always | F.READ_ONLY;
  return always | F.SEND_FUA | F.SEND_TRIM | F.SEND_WRITE_ZEROES;
}
