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
import { createHmac, timingSafeEqual } from "node:crypto";
import type { Buffer } from "node:buffer";
import { type Bytes, nextTrafficKey } from "./channel_keys.ts";

export const RECORDS_PER_KEY = 2 ** 24;
export const BYTES_PER_KEY = 2 ** 34;

/** The sequence number before the header in the MAC's input, and in GCM's nonce. */
const SEQ_BYTES = 8;
const GCM_NONCE_BYTES = 12;
/** Bytes read from the connection at a time when records are small. */
const READ_CHUNK_BYTES = 64 * 1024;
/**
 * The largest record a writer makes (the spec allows up to 1 MiB): smaller records of
 * one write are sealed in parallel, and the reader opens several at once.
 */
const SEAL_CHUNK_BYTES = 256 * 1024;
/** Records one write() call seals (in parallel) and sends before it returns. */
const WRITE_BATCH_RECORDS = 2;
/** How many records the reader opens at once, of those that have arrived whole. */
const OPEN_AHEAD_RECORDS = 8;

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
  /** The current traffic key's bytes (HMAC keys are used as bytes). */
  #raw: Bytes;
  /** The current key imported for AES-GCM; null for MAC. */
  #gcmKey: Promise<CryptoKey> | null;
  seq = 0;
  #records = 0;
  #bytes = 0;

  constructor(
    raw: Bytes,
    readonly encrypt: boolean,
    readonly usage: "encrypt" | "decrypt",
    readonly recordsPerKey: number,
    readonly bytesPerKey: number,
  ) {
    this.#raw = raw;
    this.#gcmKey = this.#import(raw);
  }

  #import(raw: Bytes): Promise<CryptoKey> | null {
    if (!this.encrypt) return null;
    return crypto.subtle.importKey("raw", raw, "AES-GCM", false, [this.usage]);
  }

  /** The key and sequence number for the next record of `bytes`, counted now. */
  next(bytes: number): { raw: Bytes; gcmKey: Promise<CryptoKey> | null; seq: number } {
    const taken = { raw: this.#raw, gcmKey: this.#gcmKey, seq: this.seq };
    this.seq += 1;
    this.#records += 1;
    this.#bytes += bytes;
    if (this.#records >= this.recordsPerKey || this.#bytes >= this.bytesPerKey) {
      this.#raw = nextTrafficKey(this.#raw);
      this.#gcmKey = this.#import(this.#raw);
      this.#records = 0;
      this.#bytes = 0;
    }
    return taken;
  }
}

/** HMAC-SHA-256 over the sequence number (big-endian u64), the header and the plaintext. */
function recordTag(key: Bytes, seq: number, header: Uint8Array, plaintext: Uint8Array): Buffer {
  const seqBytes = new Uint8Array(SEQ_BYTES);
  new DataView(seqBytes.buffer).setBigUint64(0, BigInt(seq), false);
  return createHmac("sha256", key).update(seqBytes).update(header).update(plaintext).digest();
}

function gcmNonce(seq: number): Bytes {
  const nonce = new Uint8Array(GCM_NONCE_BYTES);
  new DataView(nonce.buffer).setBigUint64(GCM_NONCE_BYTES - SEQ_BYTES, BigInt(seq), false);
  return nonce;
}

/** A record read whole, numbered, not yet opened. */
interface SealedRecord {
  /** Room for the sequence number, then the header and the sealed bytes. */
  buffer: Uint8Array<ArrayBuffer>;
  sealedBytes: number;
  raw: Bytes;
  gcmKey: Promise<CryptoKey> | null;
  seq: number;
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
  /** Records being opened, in order. */
  readonly #opening: Promise<Uint8Array>[] = [];
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
    this.#send = new Direction(options.sendKey, this.#encrypt, "encrypt", records, bytes);
    this.#receive = new Direction(options.receiveKey, this.#encrypt, "decrypt", records, bytes);
  }

  /**
   * Seals the start of `data`, at most WRITE_BATCH_RECORDS records of SEAL_CHUNK_BYTES,
   * sends them, and returns how many bytes of `data` that was (writeAll() sends the
   * rest). A call per batch shows a slow reader's progress to the send-stall check as
   * the socket takes it, not once per 32 MiB frame.
   */
  write(data: Uint8Array): Promise<number> {
    // The batch's records are started now, in order, so their sequence numbers are fixed
    // before write() returns; WebCrypto seals them on several threads meanwhile.
    const count = Math.ceil(data.length / SEAL_CHUNK_BYTES);
    const chunk = Math.ceil(data.length / count);
    const batch = Math.min(data.length, chunk * WRITE_BATCH_RECORDS);
    const records: (Promise<Uint8Array> | Uint8Array)[] = [];
    for (let at = 0; at < batch; at += chunk) {
      records.push(this.#seal(data.subarray(at, Math.min(batch, at + chunk))));
    }
    const sent = this.#writeTail.then(async () => {
      for (const record of records) await writeAll(this.#inner, await record);
    });
    this.#writeTail = sent.catch(() => {});
    return sent.then(() => batch);
  }

  async read(into: Uint8Array): Promise<number | null> {
    if (this.#failure !== null) throw this.#failure;
    if (this.#plain.length === 0) {
      const opened = await this.#nextOpened();
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

  /**
   * Seals one record. MAC records are made at once (node:crypto's HMAC is synchronous
   * and, for small records, twice as fast as a WebCrypto call); GCM records are sealed
   * by WebCrypto on its own threads.
   */
  #seal(plaintext: Uint8Array): Promise<Uint8Array> | Uint8Array {
    const { raw, gcmKey, seq } = this.#send.next(plaintext.length);
    const sealedBytes = plaintext.length + this.#tagBytes;
    const record = new Uint8Array(RECORD_HEADER_BYTES + sealedBytes);
    new DataView(record.buffer).setUint32(0, sealedBytes, true);
    const header = record.subarray(0, RECORD_HEADER_BYTES);
    if (gcmKey === null) {
      record.set(plaintext, RECORD_HEADER_BYTES);
      const body = record.subarray(RECORD_HEADER_BYTES, RECORD_HEADER_BYTES + plaintext.length);
      record.set(recordTag(raw, seq, header, body), RECORD_HEADER_BYTES + plaintext.length);
      return record;
    }
    // The caller keeps its buffer intact until write() resolves (ByteConn's rule).
    return gcmKey.then((k) =>
      crypto.subtle.encrypt(
        { name: "AES-GCM", iv: gcmNonce(seq), additionalData: header.slice() },
        k,
        // Any buffer will do for WebCrypto at run time; the type asks for a plain one.
        plaintext as Bytes,
      )
    ).then((ciphertext) => {
      record.set(new Uint8Array(ciphertext), RECORD_HEADER_BYTES);
      return record;
    });
  }

  /**
   * The next record's plaintext, in order, or null at a clean end. Records that have
   * already arrived whole are started opening together (up to OPEN_AHEAD_RECORDS), so
   * WebCrypto opens them on several threads; nothing is read from the connection
   * beyond what the caller asked for and what had already arrived.
   */
  async #nextOpened(): Promise<Uint8Array | null> {
    if (this.#opening.length === 0) {
      const first = await this.#readRecord();
      if (first === null) return null;
      this.#startOpening(first);
    }
    while (this.#opening.length < OPEN_AHEAD_RECORDS) {
      const record = this.#bufferedRecord();
      if (record === null) break;
      this.#startOpening(record);
    }
    return await this.#opening.shift()!;
  }

  #startOpening(record: SealedRecord): void {
    const opened = this.#open(record);
    // A record behind one that fails is never awaited: its own failure is not news.
    opened.catch(() => {});
    this.#opening.push(opened);
  }

  /** A whole record already in the read buffer (header and body), taken out of it; else null. */
  #bufferedRecord(): SealedRecord | null {
    const available = this.#rawEnd - this.#rawStart;
    if (available < RECORD_HEADER_BYTES) return null;
    const sealedBytes = new DataView(this.#raw.buffer, this.#rawStart).getUint32(0, true);
    if (!this.#validLength(sealedBytes)) return null; // #readRecord reports it, in order
    if (available < RECORD_HEADER_BYTES + sealedBytes) return null;
    const buffer = new Uint8Array(SEQ_BYTES + RECORD_HEADER_BYTES + sealedBytes);
    buffer.set(
      this.#raw.subarray(this.#rawStart, this.#rawStart + RECORD_HEADER_BYTES + sealedBytes),
      SEQ_BYTES,
    );
    this.#rawStart += RECORD_HEADER_BYTES + sealedBytes;
    return this.#numbered(buffer, sealedBytes);
  }

  #validLength(sealedBytes: number): boolean {
    return sealedBytes > this.#tagBytes &&
      sealedBytes <= RECORD_PLAINTEXT_BYTES_MAX + this.#tagBytes;
  }

  /** Gives the record the next sequence number and the key it was sealed under. */
  #numbered(buffer: Uint8Array<ArrayBuffer>, sealedBytes: number): SealedRecord {
    const { raw, gcmKey, seq } = this.#receive.next(sealedBytes - this.#tagBytes);
    return { buffer, sealedBytes, raw, gcmKey, seq };
  }

  /** The next record from the connection, or null when it ended between records. */
  async #readRecord(): Promise<SealedRecord | null> {
    if (!await this.#fill(RECORD_HEADER_BYTES)) return null;
    const sealedBytes = new DataView(this.#raw.buffer, this.#rawStart).getUint32(0, true);
    if (!this.#validLength(sealedBytes)) {
      throw this.#tampered(`a record claims ${sealedBytes} sealed bytes`);
    }
    // The record, with room in front for the MAC's sequence number.
    const buffer = new Uint8Array(SEQ_BYTES + RECORD_HEADER_BYTES + sealedBytes);
    await this.#take(buffer.subarray(SEQ_BYTES));
    return this.#numbered(buffer, sealedBytes);
  }

  /** Checks and opens one record; its plaintext is a view of its own buffer. */
  async #open({ buffer, sealedBytes, raw, gcmKey, seq }: SealedRecord): Promise<Uint8Array> {
    const record = buffer.subarray(SEQ_BYTES);
    const header = record.subarray(0, RECORD_HEADER_BYTES);
    const plaintextBytes = sealedBytes - this.#tagBytes;
    if (gcmKey !== null) {
      try {
        return new Uint8Array(
          await crypto.subtle.decrypt(
            { name: "AES-GCM", iv: gcmNonce(seq), additionalData: header },
            await gcmKey,
            record.subarray(RECORD_HEADER_BYTES),
          ),
        );
      } catch {
        throw this.#tampered(`record ${seq} failed its check`);
      }
    }
    const plaintext = record.subarray(RECORD_HEADER_BYTES, RECORD_HEADER_BYTES + plaintextBytes);
    const tag = record.subarray(RECORD_HEADER_BYTES + plaintextBytes);
    if (!timingSafeEqual(recordTag(raw, seq, header, plaintext), tag)) {
      throw this.#tampered(`record ${seq} failed its check`);
    }
    return plaintext;
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
