/**
 * An export's writer lease (protocol README, "Writer lease"): by default one client at
 * a time may write, as qemu-nbd serves one client and DRBD has one primary, so two
 * writers that do not know of each other cannot overwrite each other's data. Others
 * may read. `--shared-writers` turns the lease off for writers that coordinate
 * themselves (a cluster filesystem).
 *
 * Every writing connection holds a grant; the client that holds the lease may hold
 * several (a client's connections, or the export's NBD port's). The lease is free
 * again when its holder's last grant is released: the connection ended (cleanly, or
 * closed by the export after it went silent, see exporter.ts), or it was fenced by a
 * newer connection of the same client, which then takes the lease at once.
 *
 * A grant to another writer than the last one starts a new write generation, durably,
 * before it is handed out: a refused client never raises it, and a client that
 * reconnects (or whose abandoned handshake was granted) does not either.
 *
 * Invariants:
 * 1. Without shared writers, all grants outstanding belong to one holder.
 * 2. holder.grants counts the grants handed out and not yet released, and is >= 1.
 */

import { LEASE_IDLE_MS } from "../constants.ts";
import { assert } from "../lib/assert.ts";
import { type Clock, systemClock } from "../lib/clock.ts";
import { DeviceError } from "../lib/errors.ts";
import type { WriteGeneration } from "./write_generation.ts";

/** Who asks for the lease: `key` is the client's identity (hex), `peer` where it connects from. */
export interface LeaseClaimant {
  readonly key: string;
  readonly peer: string;
}

/** One connection's right to write; release() once, when the connection ends. */
export interface WriteGrant {
  readonly generation: number;
  release(): void;
}

/** What `dst status` shows of the lease holder. */
export interface LeaseHolderStatus {
  clientId: string;
  peer: string;
  heldForMs: number;
  connections: number;
}

/** The lease is another client's: EPERM on the wire, with a message that says how to go on. */
export class LeaseHeldError extends DeviceError {
  override name = "LeaseHeldError";
  constructor(readonly holder: LeaseHolderStatus) {
    super("EPERM", describeHolder(holder));
  }
}

/** The refusal's text, for the refused client's user. */
function describeHolder(holder: LeaseHolderStatus): string {
  const seconds = Math.round(holder.heldForMs / 1000);
  const idleSeconds = LEASE_IDLE_MS / 1000;
  return `the write lease is held by ${holder.peer} (client ${holder.clientId.slice(0, 8)}, ` +
    `for ${seconds} s): stop that writer first (the lease frees when it disconnects, or ` +
    `${idleSeconds} s after it goes silent), connect read-only to read ` +
    `(dst attach --read-only), or restart the export with --shared-writers if the writers ` +
    `coordinate their writes themselves`;
}

interface Holder {
  key: string;
  peer: string;
  sinceMs: number;
  grants: number;
}

export class WriterLease {
  #holder: Holder | null = null;
  readonly #clock: Clock;

  constructor(
    readonly generation: WriteGeneration,
    readonly sharedWriters: boolean,
    clock: Clock = systemClock,
  ) {
    this.#clock = clock;
  }

  /** The current holder, or null when the lease is free (always null with shared writers). */
  get holder(): LeaseHolderStatus | null {
    const holder = this.#holder;
    if (holder === null) return null;
    return {
      clientId: holder.key,
      peer: holder.peer,
      heldForMs: Math.round(this.#clock.nowMs() - holder.sinceMs),
      connections: holder.grants,
    };
  }

  /** True when `key` holds the lease now. */
  heldBy(key: string): boolean {
    return this.#holder?.key === key;
  }

  /**
   * Grants `who` the right to write and starts a write generation for it; throws
   * LeaseHeldError when another client holds the lease, or the generation's own
   * error when it cannot be made durable (then nothing is granted).
   */
  async acquire(who: LeaseClaimant): Promise<WriteGrant> {
    if (!this.sharedWriters) {
      const holder = this.#holder;
      if (holder !== null && holder.key !== who.key) throw new LeaseHeldError(this.holder!);
      // Taken before the generation is awaited, so two claimants cannot both pass the check.
      if (holder === null) {
        this.#holder = { key: who.key, peer: who.peer, sinceMs: this.#clock.nowMs(), grants: 1 };
      } else {
        holder.grants += 1;
        holder.peer = who.peer;
      }
    }
    let generation: number;
    try {
      generation = await this.generation.grant(who.key);
    } catch (error) {
      this.#release(who.key);
      throw error;
    }
    let released = false;
    return {
      generation,
      release: () => {
        if (released) return;
        released = true;
        this.#release(who.key);
      },
    };
  }

  #release(key: string): void {
    if (this.sharedWriters) return;
    const holder = this.#holder;
    assert(holder !== null && holder.key === key, "Invariant 1: only the holder releases");
    holder.grants -= 1;
    if (holder.grants === 0) this.#holder = null;
    this.#invariants();
  }

  #invariants(): void {
    assert(this.#holder === null || this.#holder.grants >= 1, "Invariant 2: a holder holds");
  }
}
