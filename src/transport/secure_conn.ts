/**
 * Version 2's record layer (protocol README, "Records"): a ByteConn over another
 * ByteConn that seals what is written into records and opens what is read. Above it
 * the version 1 byte stream runs unchanged, so framing, fencing and requests have
 * one implementation for both versions.
 *
 * A record is a u32 count of sealed bytes, then the sealed bytes: AES-256-GCM
 * ciphertext and tag (PROTECTION_ENCRYPT) or plaintext and HMAC-SHA-256 tag
 * (PROTECTION_MAC). The sequence number is implicit: each side counts the records of
 * a direction, and the tag covers it (GCM's nonce, the MAC's input) with the count
 * header. TCP delivers in order, so a replayed, reordered, duplicated or dropped
 * record meets the wrong number and fails, as does a flipped bit. A record that
 * fails closes the connection before any of its bytes goes up; the peer reconnects.
 *
 * Each direction's key is replaced by HKDF of itself after RECORDS_PER_KEY records
 * or BYTES_PER_KEY bytes, far inside AES-GCM's limits (TLS 1.3, RFC 8446 §5.5);
 * both sides count the same records, so they switch at the same one.
 */

import { ChannelTamperedError } from "../lib/errors.ts";
import {
  GCM_TAG_BYTES,
  MAC_TAG_BYTES,
  PROTECTION_ENCRYPT,
  RECORD_HEADER_BYTES,
  RECORD_PLAINTEXT_BYTES_MAX,
} from "../protocol/wire.ts";
import { type ByteConn, closeQuietly, readExact, writeAll } from "./byte_conn.ts";
import { type Bytes, nextTrafficKey } from "./channel_keys.ts";

export const RECORDS_PER_KEY = 2 ** 24;
export const BYTES_PER_KEY = 2 ** 34;

/** The sequence number before the header in the MAC's input, and in GCM's nonce. */
const SEQ_BYTES = 8;
const GCM_NONCE_BYTES = 12;
/** Bytes read from the connection at a time when records are small. */
const READ_CHUNK_BYTES = 64 * 1024;

export interface SecureConnOptions {
  /** PROTECTION_ENCRYPT or PROTECTION_MAC. */
  protection: number;
  sendKey: Bytes;
  receiveKey: Bytes;
  /** Who is at the other end, for the failure message ("the export at 10.0.0.2:1025"). */
  peer: string;
  /** Called once when a record fails its check (the export counts and logs it). */
  onTampered?: (message: string) => void;
  /** Key update thresholds; tests make them small. */
  recordsPerKey?: number;
  bytesPerKey?: number;
}

/** One direction's key and counters. */
class Direction {
  #raw: Promise<Bytes>;
  #key: Promise<CryptoKey>;
  seq = 0;
  #records = 0;
  #bytes = 0;

  constructor(
    raw: Bytes,
    readonly encrypt: boolean,
    readonly usage: "encrypt" | "decrypt" | "sign" | "verify",
    readonly recordsPerKey: number,
    readonly bytesPerKey: number,
  ) {
    this.#raw = Promise.resolve(raw);
    this.#key = this.#import(this.#raw);
  }

  #import(raw: Promise<Bytes>): Promise<CryptoKey> {
    return raw.then((bytes) =>
      crypto.subtle.importKey(
        "raw",
        bytes,
        this.encrypt ? "AES-GCM" : { name: "HMAC", hash: "SHA-256" },
        false,
        [this.usage],
      )
    );
  }

  /** The key and sequence number for the next record of `bytes`, counted now. */
  next(bytes: number): { key: Promise<CryptoKey>; seq: number } {
    const taken = { key: this.#key, seq: this.seq };
    this.seq += 1;
    this.#records += 1;
    this.#bytes += bytes;
    if (this.#records >= this.recordsPerKey || this.#bytes >= this.bytesPerKey) {
      this.#raw = this.#raw.then(nextTrafficKey);
      this.#key = this.#import(this.#raw);
      this.#records = 0;
      this.#bytes = 0;
    }
    return taken;
  }
}

function gcmNonce(seq: number): Bytes {
  const nonce = new Uint8Array(GCM_NONCE_BYTES);
  new DataView(nonce.buffer).setBigUint64(GCM_NONCE_BYTES - SEQ_BYTES, BigInt(seq), false);
  return nonce;
}

export class SecureConn implements ByteConn {
  readonly #inner: ByteConn & { closeWrite?: () => Promise<void> };
  readonly #encrypt: boolean;
  readonly #tagBytes: number;
  readonly #send: Direction;
  readonly #receive: Direction;
  readonly #options: SecureConnOptions;
  /** Opened plaintext not yet read. */
  #plain: Uint8Array = new Uint8Array(0);
  /** Bytes read from the connection and not yet parsed into records. */
  #raw = new Uint8Array(READ_CHUNK_BYTES);
  #rawStart = 0;
  #rawEnd = 0;
  /** Records go out in sequence order: each write waits for the one before. */
  #writeTail: Promise<void> = Promise.resolve();
  #failure: ChannelTamperedError | null = null;

  constructor(inner: ByteConn, options: SecureConnOptions) {
    this.#inner = inner;
    this.#options = options;
    this.#encrypt = options.protection === PROTECTION_ENCRYPT;
    this.#tagBytes = this.#encrypt ? GCM_TAG_BYTES : MAC_TAG_BYTES;
    const records = options.recordsPerKey ?? RECORDS_PER_KEY;
    const bytes = options.bytesPerKey ?? BYTES_PER_KEY;
    this.#send = new Direction(
      options.sendKey,
      this.#encrypt,
      this.#encrypt ? "encrypt" : "sign",
      records,
      bytes,
    );
    this.#receive = new Direction(
      options.receiveKey,
      this.#encrypt,
      this.#encrypt ? "decrypt" : "verify",
      records,
      bytes,
    );
  }

  /** Seals `data` (in records of at most RECORD_PLAINTEXT_BYTES_MAX) and sends it whole. */
  write(data: Uint8Array): Promise<number> {
    // Every record is started now, in order, so its sequence number and its copy of
    // the caller's bytes are fixed before write() returns; WebCrypto seals them on its
    // own threads meanwhile.
    const records: Promise<Uint8Array>[] = [];
    for (let at = 0; at < data.length; at += RECORD_PLAINTEXT_BYTES_MAX) {
      records.push(this.#seal(data.subarray(at, at + RECORD_PLAINTEXT_BYTES_MAX)));
    }
    const sent = this.#writeTail.then(async () => {
      for (const record of records) await writeAll(this.#inner, await record);
    });
    this.#writeTail = sent.catch(() => {});
    return sent.then(() => data.length);
  }

  async read(into: Uint8Array): Promise<number | null> {
    if (this.#failure !== null) throw this.#failure;
    if (this.#plain.length === 0) {
      const opened = await this.#nextRecord();
      if (opened === null) return null;
      this.#plain = opened;
    }
    const n = Math.min(into.length, this.#plain.length);
    into.set(this.#plain.subarray(0, n));
    this.#plain = this.#plain.subarray(n);
    return n;
  }

  close(): void {
    this.#inner.close();
  }

  /** Half-close, when the connection underneath has it (the export's linger uses it). */
  closeWrite(): Promise<void> {
    if (typeof this.#inner.closeWrite !== "function") return Promise.resolve();
    return this.#writeTail.then(() => this.#inner.closeWrite!());
  }

  #seal(plaintext: Uint8Array): Promise<Uint8Array> {
    const { key, seq } = this.#send.next(plaintext.length);
    const sealedBytes = plaintext.length + this.#tagBytes;
    if (this.#encrypt) {
      const header = new Uint8Array(RECORD_HEADER_BYTES);
      new DataView(header.buffer).setUint32(0, sealedBytes, true);
      // The caller keeps its buffer intact until write() resolves (ByteConn's rule).
      const sealed = key.then((k) =>
        crypto.subtle.encrypt(
          { name: "AES-GCM", iv: gcmNonce(seq), additionalData: header },
          k,
          // Any buffer will do for WebCrypto at run time; the type asks for a plain one.
          plaintext as Bytes,
        )
      );
      return sealed.then((ciphertext) => {
        const record = new Uint8Array(RECORD_HEADER_BYTES + sealedBytes);
        record.set(header);
        record.set(new Uint8Array(ciphertext), RECORD_HEADER_BYTES);
        return record;
      });
    }
    // MAC input: sequence number, header, plaintext; the record is all but the sequence number.
    const buffer = new Uint8Array(SEQ_BYTES + RECORD_HEADER_BYTES + sealedBytes);
    const view = new DataView(buffer.buffer);
    view.setBigUint64(0, BigInt(seq), false);
    view.setUint32(SEQ_BYTES, sealedBytes, true);
    buffer.set(plaintext, SEQ_BYTES + RECORD_HEADER_BYTES);
    const covered = buffer.subarray(0, SEQ_BYTES + RECORD_HEADER_BYTES + plaintext.length);
    return key.then(async (k) => {
      const tag = new Uint8Array(await crypto.subtle.sign("HMAC", k, covered));
      buffer.set(tag, covered.length);
      return buffer.subarray(SEQ_BYTES);
    });
  }

  /** The next record's plaintext, or null when the connection ended between records. */
  async #nextRecord(): Promise<Uint8Array | null> {
    if (!await this.#fill(RECORD_HEADER_BYTES)) return null;
    const sealedBytes = new DataView(this.#raw.buffer, this.#rawStart).getUint32(0, true);
    if (
      sealedBytes <= this.#tagBytes || sealedBytes > RECORD_PLAINTEXT_BYTES_MAX + this.#tagBytes
    ) {
      throw this.#tampered(`a record claims ${sealedBytes} sealed bytes`);
    }
    // The record, with room in front for the MAC's sequence number.
    const buffer = new Uint8Array(SEQ_BYTES + RECORD_HEADER_BYTES + sealedBytes);
    const record = buffer.subarray(SEQ_BYTES);
    await this.#take(record);
    const { key, seq } = this.#receive.next(sealedBytes - this.#tagBytes);
    const plaintextBytes = sealedBytes - this.#tagBytes;
    const k = await key;
    if (this.#encrypt) {
      try {
        return new Uint8Array(
          await crypto.subtle.decrypt(
            {
              name: "AES-GCM",
              iv: gcmNonce(seq),
              additionalData: record.subarray(0, RECORD_HEADER_BYTES),
            },
            k,
            record.subarray(RECORD_HEADER_BYTES),
          ),
        );
      } catch {
        throw this.#tampered(`record ${seq} failed its check`);
      }
    }
    new DataView(buffer.buffer).setBigUint64(0, BigInt(seq), false);
    const covered = buffer.subarray(0, SEQ_BYTES + RECORD_HEADER_BYTES + plaintextBytes);
    const tag = buffer.subarray(covered.length);
    if (!await crypto.subtle.verify("HMAC", k, tag, covered)) {
      throw this.#tampered(`record ${seq} failed its check`);
    }
    return buffer.subarray(SEQ_BYTES + RECORD_HEADER_BYTES, covered.length);
  }

  /**
   * Makes `bytes` unparsed bytes available at #rawStart; false when the connection
   * ended before the first of them (between records), a ConnectionClosedError when
   * it ended inside.
   */
  async #fill(bytes: number): Promise<boolean> {
    if (this.#rawEnd - this.#rawStart >= bytes) return true;
    if (this.#rawStart > 0) {
      this.#raw.copyWithin(0, this.#rawStart, this.#rawEnd);
      this.#rawEnd -= this.#rawStart;
      this.#rawStart = 0;
    }
    while (this.#rawEnd < bytes) {
      const n = await this.#inner.read(this.#raw.subarray(this.#rawEnd));
      if (n === null) {
        if (this.#rawEnd === 0) return false;
        throw this.#tampered(`the connection ended inside a record`, false);
      }
      this.#rawEnd += n;
    }
    return true;
  }

  /** Fills `into` with the next bytes: what is buffered first, the rest straight from the connection. */
  async #take(into: Uint8Array): Promise<void> {
    const buffered = Math.min(into.length, this.#rawEnd - this.#rawStart);
    into.set(this.#raw.subarray(this.#rawStart, this.#rawStart + buffered));
    this.#rawStart += buffered;
    if (buffered === into.length) return;
    const rest = into.subarray(buffered);
    if (rest.length < READ_CHUNK_BYTES / 2) {
      // Small: read ahead into the buffer, so the next header comes with it.
      await this.#fill(rest.length).then((ok) => {
        if (!ok) throw this.#tampered(`the connection ended inside a record`, false);
      });
      rest.set(this.#raw.subarray(this.#rawStart, this.#rawStart + rest.length));
      this.#rawStart += rest.length;
      return;
    }
    try {
      await readExact(this.#inner, rest);
    } catch {
      throw this.#tampered(`the connection ended inside a record`, false);
    }
  }

  /**
   * Records the failure and closes the connection. A record cut short by the
   * connection's end is not counted as tampering: a crash or a cut link does that too.
   */
  #tampered(what: string, counts = true): ChannelTamperedError {
    const message = `${what} from ${this.#options.peer} (tampered with, replayed, ` +
      `reordered or cut on the way); closing the connection`;
    const error = new ChannelTamperedError(message);
    if (this.#failure === null) {
      this.#failure = error;
      if (counts) this.#options.onTampered?.(message);
    }
    closeQuietly(this.#inner);
    return error;
  }
}
