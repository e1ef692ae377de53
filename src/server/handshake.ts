/**
 * The export's side of the handshake (protocol README, "Handshake" and "Version 2:
 * keys"): read the client hello, pick the version, authentication and protection,
 * answer with the export's geometry, or refuse with a reason.
 *
 * Without keys it speaks version 1 only. With keys it speaks version 2 only: the
 * client names a key and both sides prove it (channel_keys.ts); only then is the
 * client admitted (lease, write generation, fencing), and the server hello and
 * everything after it travel in protected records (secure_conn.ts). Configuring a
 * key means requiring it: a keyed export refuses unkeyed clients, and a keyed
 * client refuses an export that cannot prove the key.
 *
 * A DST client speaks first, at once; an NBD client waits for the server. A peer that
 * sends nothing for NBD_GREETING_GRACE_MS is taken for an NBD client at the wrong port
 * and answered as an NBD server would (src/nbd/ encodes the bytes), with a refusal
 * that names the port to use: the user reads it instead of waiting for a timeout. A
 * DST hello that comes after that greeting (a loaded machine, a slow link) is answered
 * with HELLO_TOO_LATE, so its client connects again instead of reporting an NBD server.
 */

import {
  HANDSHAKE_TIMEOUT_MS,
  IN_FLIGHT_PER_CONNECTION_MAX,
  NBD_GREETING_GRACE_MS,
  PAYLOAD_BYTES_MAX,
} from "../constants.ts";
import type { DeviceInfo } from "../device/block_device.ts";
import {
  AUTH_NONE,
  AUTH_PSK,
  type ClientHello,
  ClientHelloLayout,
  ClientKeyShareLayout,
  ClientProofLayout,
  decodeClientHello,
  decodeClientKeyShare,
  decodeClientProof,
  encodeRefusalReason,
  encodeServerHello,
  encodeServerKeyShare,
  encodeServerKeyShareBody,
  EXPORT_ID_BYTES,
  EXPORT_INSTANCE_BYTES,
  ExportFlag,
  HELLO_STATUS_TEXT,
  HelloStatus,
  MAGIC_CLIENT_HELLO,
  NONCE_BYTES,
  PROTECTION_ENCRYPT,
  PROTECTION_NONE,
  PROTOCOL_VERSION,
  PROTOCOL_VERSION_KEYED,
  type ServerHello,
  WRITE_EPOCH_BYTES,
} from "../protocol/mod.ts";
import { refuseOptions } from "../nbd/handshake.ts";
import { encodeGreeting } from "../nbd/wire.ts";
import { type ByteConn, readExact, writeAll } from "../transport/byte_conn.ts";
import {
  checkProof,
  deriveChannelKeys,
  makeEphemeral,
  makeProof,
  sharedSecret,
  transcriptHash,
} from "../transport/channel_keys.ts";
import { SecureConn } from "../transport/secure_conn.ts";
import { hexToBytes } from "../lib/hex.ts";
import { type Clock, systemClock } from "../lib/clock.ts";
import { describeError } from "../lib/errors.ts";
import { type Key, KEY_BYTES } from "../lib/key_file.ts";
import { printable } from "../lib/printable.ts";

/** A keyed export's keys and protection. */
export interface ExportKeys {
  /** The keys a client may prove, as they are now (a reload changes them). */
  keys(): readonly Key[];
  /** PROTECTION_ENCRYPT (default) or PROTECTION_MAC. */
  protection: number;
  /** A record from `peer` failed its check. */
  onTampered(peer: string, message: string): void;
}

export interface HandshakeOptions {
  /** Who connected, for messages. */
  peer: string;
  /** Null: no key, version 1. */
  keys: ExportKeys | null;
  /**
   * Set when the peer's address may not connect (--allow): the hello is read, then
   * refused in the clear with this reason, before any cryptography is spent.
   */
  denied?: string;
  clock?: Clock;
}

/** A finished handshake: the connection to serve (protected when keyed) and the key proved. */
export type Handshake =
  | { ok: true; conn: ByteConn; key: Key | null }
  | { ok: false; reason: string };

/** What the export decided about a client whose hello it could accept. */
export type Admission =
  | {
    ok: true;
    features: number;
    writeGeneration: number;
    writeEpoch: string;
    exportInstance: string;
    /** This client may only read (an allow rule's `ro`): the hello says READ_ONLY. */
    readOnly?: boolean;
  }
  | { ok: false; status: number; reason: string };

/**
 * Runs the handshake. `admit(hello, key)` decides about a client that speaks this
 * version and, when keyed, proved a key (busy, access, lease, fencing happen there);
 * it runs before the server hello is sent, so whatever it waits for is done before
 * the client can send its first request.
 */
export async function acceptHandshake(
  conn: ByteConn,
  info: DeviceInfo,
  admit: (hello: ClientHello, key: Key | null) => Promise<Admission>,
  options: HandshakeOptions,
): Promise<Handshake> {
  const clock = options.clock ?? systemClock;
  const helloBytes = new Uint8Array(ClientHelloLayout.SIZE);
  const timer = clock.after(HANDSHAKE_TIMEOUT_MS, () => conn.close());
  try {
    try {
      // The magic first: a client speaking something else is told so at once, not after a timeout.
      const magicBytes = helloBytes.subarray(0, 4);
      const first = conn.read(magicBytes);
      if (await silentFor(first, NBD_GREETING_GRACE_MS, clock)) {
        return await answerNbdClient(conn, info, first, helloBytes);
      }
      const n = await first;
      if (n === null) throw new Error("the client left before its hello");
      await readExact(conn, magicBytes.subarray(n));
      const magic = new DataView(helloBytes.buffer).getUint32(ClientHelloLayout.magic, true);
      if (magic !== MAGIC_CLIENT_HELLO) {
        return { ok: false, reason: "not a DST client (bad client hello magic)" };
      }
      await readExact(conn, helloBytes.subarray(4));
    } catch {
      return { ok: false, reason: `no client hello within ${HANDSHAKE_TIMEOUT_MS} ms` };
    }
    const hello = decodeClientHello(helloBytes);
    if (typeof hello === "string") return { ok: false, reason: hello };
    // A key share follows every hello that offers a key; it is read even when the
    // export will refuse, so the refusal is not lost to a reset over unread bytes.
    let shareBytes: Uint8Array | null = null;
    if (offersKey(hello)) {
      shareBytes = new Uint8Array(ClientKeyShareLayout.SIZE);
      try {
        await readExact(conn, shareBytes);
      } catch {
        return { ok: false, reason: `no key share within ${HANDSHAKE_TIMEOUT_MS} ms` };
      }
    }
    if (options.denied !== undefined) {
      return await answer(
        conn,
        info,
        shareBytes === null ? PROTOCOL_VERSION : PROTOCOL_VERSION_KEYED,
        Promise.resolve({ ok: false, status: HelloStatus.ACCESS_DENIED, reason: options.denied }),
      );
    }
    if (options.keys === null) {
      return await answer(conn, info, PROTOCOL_VERSION, admitV1(hello, admit));
    }
    if (shareBytes === null) {
      return await answer(
        conn,
        info,
        PROTOCOL_VERSION,
        Promise.resolve({
          ok: false,
          status: HelloStatus.ACCESS_DENIED,
          reason: "this export requires a key: give the client --key FILE holding one of " +
            "the export's keys (made with `dst keygen`)",
        }),
      );
    }
    if (hello.versionMin > PROTOCOL_VERSION_KEYED || hello.versionMax < PROTOCOL_VERSION_KEYED) {
      return await answer(
        conn,
        info,
        PROTOCOL_VERSION_KEYED,
        Promise.resolve(refuse(HelloStatus.VERSION_UNSUPPORTED)),
      );
    }
    if ((hello.protections & options.keys.protection) === 0) {
      return await answer(
        conn,
        info,
        PROTOCOL_VERSION_KEYED,
        Promise.resolve({
          ok: false,
          status: HelloStatus.PROTECTION_UNSUPPORTED,
          reason: `this export requires every record to be ${
            protectionName(options.keys.protection)
          }, which the client does not accept`,
        }),
      );
    }
    return await authenticate(conn, info, hello, helloBytes, shareBytes, admit, options, timer);
  } finally {
    timer.cancel();
  }
}

/** What an NBD client at this port is told, in the NBD option error it prints. */
export const NBD_WRONG_PORT_MESSAGE = "this is a DST port (dst export --listen); NBD clients " +
  "connect to the export's --nbd port, or run dst attach HOST:PORT on the client machine";

/** True when `read` has not settled within `ms`; the read goes on either way. */
async function silentFor(read: Promise<unknown>, ms: number, clock: Clock): Promise<boolean> {
  const { promise, resolve } = Promise.withResolvers<boolean>();
  const timer = clock.after(ms, () => resolve(true));
  read.then(() => resolve(false), () => resolve(false));
  try {
    return await promise;
  } finally {
    timer.cancel();
  }
}

/** What a DST client whose hello came after the NBD greeting is told, after HELLO_TOO_LATE. */
export const HELLO_TOO_LATE_MESSAGE = "the export had taken this connection for an NBD " +
  `client: its hello came more than ${NBD_GREETING_GRACE_MS / 1000} s after connecting; ` +
  "connect again";

/**
 * A peer that stayed silent: greets it as an NBD server, reads its client flags
 * (`first`, the read already under way, brings their first bytes into the start of
 * `helloBytes`) and refuses each of its options with NBD_WRONG_PORT_MESSAGE. Flags that
 * are a DST hello's magic are a DST client's late hello: it is refused with
 * HELLO_TOO_LATE. The handshake's timeout still bounds all of it.
 */
async function answerNbdClient(
  conn: ByteConn,
  info: DeviceInfo,
  first: Promise<number | null>,
  helloBytes: Uint8Array,
): Promise<Handshake> {
  const silent = `sent nothing for ${NBD_GREETING_GRACE_MS} ms`;
  const flagBytes = helloBytes.subarray(0, 4);
  try {
    await writeAll(conn, encodeGreeting());
    const n = await first;
    if (n === null) throw new Error("it left");
    await readExact(conn, flagBytes.subarray(n));
  } catch {
    return {
      ok: false,
      reason: `the client ${silent}, and did not answer the NBD greeting it was then sent`,
    };
  }
  if (
    new DataView(flagBytes.buffer, flagBytes.byteOffset).getUint32(0, true) === MAGIC_CLIENT_HELLO
  ) {
    return await refuseLateHello(conn, info, helloBytes);
  }
  const options = await refuseOptions(conn, NBD_WRONG_PORT_MESSAGE);
  return {
    ok: false,
    reason: `an NBD client at the DST port (it ${silent}, then answered the NBD greeting and ` +
      `sent ${options.length === 0 ? "no option" : `options ${options.join(", ")}`}): told it ` +
      `to use the export's --nbd port, or dst attach`,
  };
}

/**
 * A DST hello whose magic came after the NBD greeting: the rest of it (and its key
 * share) is read, so the refusal is not lost to a reset over unread bytes, and it is
 * refused in the clear with HELLO_TOO_LATE. Its client knows then that it reached a DST
 * export, only too late, and connects again.
 */
async function refuseLateHello(
  conn: ByteConn,
  info: DeviceInfo,
  helloBytes: Uint8Array,
): Promise<Handshake> {
  const late = `a DST client's hello came after ${NBD_GREETING_GRACE_MS} ms, when it had ` +
    `already been greeted as an NBD client (a loaded machine or a slow link?)`;
  let hello: ClientHello | string;
  try {
    await readExact(conn, helloBytes.subarray(4));
    hello = decodeClientHello(helloBytes);
    if (typeof hello !== "string" && offersKey(hello)) {
      await readExact(conn, new Uint8Array(ClientKeyShareLayout.SIZE));
    }
  } catch {
    return { ok: false, reason: `${late}; it left before the rest of its hello` };
  }
  if (typeof hello === "string") return { ok: false, reason: `${late}; ${hello}` };
  await answer(
    conn,
    info,
    offersKey(hello) ? PROTOCOL_VERSION_KEYED : PROTOCOL_VERSION,
    Promise.resolve({
      ok: false,
      status: HelloStatus.HELLO_TOO_LATE,
      reason: HELLO_TOO_LATE_MESSAGE,
    }),
  );
  return { ok: false, reason: `${late}: told it to connect again` };
}

function offersKey(hello: ClientHello): boolean {
  return (hello.authMethods & AUTH_PSK) !== 0 && hello.versionMax >= PROTOCOL_VERSION_KEYED;
}

/**
 * What `protection` does to a record, as a participle: "records are encrypted
 * (AES-256-GCM)", "records are authenticated (HMAC-SHA-256)".
 */
export function protectionName(protection: number): string {
  return protection === PROTECTION_ENCRYPT
    ? "encrypted (AES-256-GCM)"
    : "authenticated (HMAC-SHA-256)";
}

/** Version 1's checks, then the caller's. */
function admitV1(
  hello: ClientHello,
  admit: (hello: ClientHello, key: Key | null) => Promise<Admission>,
): Promise<Admission> {
  if (offersKey(hello) && (hello.authMethods & AUTH_NONE) === 0) {
    return Promise.resolve({
      ok: false,
      status: HelloStatus.AUTH_UNSUPPORTED,
      reason: "this export has no key, and the client was given one: start the export " +
        "with --key FILE, or connect without --key",
    });
  }
  if (hello.versionMin > PROTOCOL_VERSION || hello.versionMax < PROTOCOL_VERSION) {
    return Promise.resolve(refuse(HelloStatus.VERSION_UNSUPPORTED));
  }
  if ((hello.authMethods & AUTH_NONE) === 0) {
    return Promise.resolve(refuse(HelloStatus.AUTH_UNSUPPORTED));
  }
  if ((hello.protections & PROTECTION_NONE) === 0) {
    return Promise.resolve(refuse(HelloStatus.PROTECTION_UNSUPPORTED));
  }
  return admit(hello, null);
}

/**
 * Version 2: prove the key both ways, then admit the client and answer inside the
 * protected channel. A key name the export does not have is answered with a proof
 * made from a random key, so from outside it looks like a wrong key.
 */
async function authenticate(
  conn: ByteConn,
  info: DeviceInfo,
  hello: ClientHello,
  helloBytes: Uint8Array,
  shareBytes: Uint8Array,
  admit: (hello: ClientHello, key: Key | null) => Promise<Admission>,
  options: HandshakeOptions,
  timer: { cancel(): void },
): Promise<Handshake> {
  const exportKeys = options.keys!;
  const share = decodeClientKeyShare(shareBytes);
  if (typeof share === "string") return { ok: false, reason: share };
  const named = `key "${printable(share.keyName)}"`;
  const key = exportKeys.keys().find((candidate) => candidate.name === share.keyName) ?? null;
  const preSharedKey = key?.bytes.slice() ?? crypto.getRandomValues(new Uint8Array(KEY_BYTES));
  const own = await makeEphemeral();
  let secret: Uint8Array<ArrayBuffer>;
  try {
    secret = await sharedSecret(own, share.publicKey);
  } catch (error) {
    return { ok: false, reason: `${describeError(error)} (${named})` };
  }
  const body = encodeServerKeyShareBody({
    version: PROTOCOL_VERSION_KEYED,
    protection: exportKeys.protection,
    nonce: crypto.getRandomValues(new Uint8Array(NONCE_BYTES)),
    publicKey: own.publicKey,
  });
  const transcript = await transcriptHash(helloBytes, shareBytes, body);
  const keys = await deriveChannelKeys(preSharedKey, secret, transcript);
  const proof = await makeProof(keys, transcript, "server");
  const shareOut = encodeServerKeyShare({
    version: PROTOCOL_VERSION_KEYED,
    protection: exportKeys.protection,
    nonce: body.subarray(8, 8 + NONCE_BYTES),
    publicKey: own.publicKey,
    proof,
  });
  await writeAll(conn, shareOut);
  const proofBytes = new Uint8Array(ClientProofLayout.SIZE);
  try {
    await readExact(conn, proofBytes);
  } catch {
    return {
      ok: false,
      reason: key === null
        ? `the client named ${named}, which this export does not have`
        : `the client did not prove ${named} (its key by that name differs, or it gave up)`,
    };
  }
  timer.cancel();
  const clientProof = decodeClientProof(proofBytes);
  if (typeof clientProof === "string") return { ok: false, reason: clientProof };
  if (key === null || !await checkProof(keys, transcript, "client", clientProof)) {
    return { ok: false, reason: `the client's proof of ${named} is wrong` };
  }
  const secure = new SecureConn(conn, {
    protection: exportKeys.protection,
    sendKey: keys.serverToClient,
    receiveKey: keys.clientToServer,
    peer: `client ${options.peer}`,
    onTampered: (message) => exportKeys.onTampered(options.peer, message),
  });
  const result = await answer(
    secure,
    info,
    PROTOCOL_VERSION_KEYED,
    admit(hello, key),
    { authMethod: AUTH_PSK, protection: exportKeys.protection },
  );
  return result.ok ? { ok: true, conn: secure, key } : result;
}

/** Sends the server hello for `admission` (and the reason, when it refuses). */
async function answer(
  conn: ByteConn,
  info: DeviceInfo,
  version: number,
  admitted: Promise<Admission>,
  chosen = { authMethod: AUTH_NONE, protection: PROTECTION_NONE },
): Promise<Handshake> {
  const admission = await admitted;
  const ok = admission.ok;
  const readOnly = info.readOnly || (admission.ok && admission.readOnly === true);
  // A refused client learns why, and nothing about the export.
  const reply: ServerHello = {
    version,
    status: admission.ok ? HelloStatus.OK : admission.status,
    features: admission.ok ? admission.features : 0,
    authMethod: chosen.authMethod,
    protection: chosen.protection,
    sizeBytes: ok ? info.sizeBytes : 0,
    blockSize: ok ? info.blockSize : 0,
    exportFlags: ok && readOnly ? ExportFlag.READ_ONLY : 0,
    payloadBytesMax: ok ? PAYLOAD_BYTES_MAX : 0,
    inFlightMax: ok ? IN_FLIGHT_PER_CONNECTION_MAX : 0,
    exportId: ok ? hexToBytes(info.id) : new Uint8Array(EXPORT_ID_BYTES),
    nonce: crypto.getRandomValues(new Uint8Array(NONCE_BYTES)),
    writeGeneration: admission.ok ? admission.writeGeneration : 0,
    writeEpoch: admission.ok ? hexToBytes(admission.writeEpoch) : new Uint8Array(WRITE_EPOCH_BYTES),
    exportInstance: admission.ok
      ? hexToBytes(admission.exportInstance)
      : new Uint8Array(EXPORT_INSTANCE_BYTES),
  };
  const helloOut = encodeServerHello(reply);
  if (admission.ok) {
    await writeAll(conn, helloOut);
    return { ok: true, conn, key: null };
  }
  const reasonOut = encodeRefusalReason(admission.reason);
  const both = new Uint8Array(helloOut.length + reasonOut.length);
  both.set(helloOut);
  both.set(reasonOut, helloOut.length);
  await writeAll(conn, both);
  return { ok: false, reason: admission.reason };
}

/** A refusal whose reason is the status's own text. */
export function refuse(status: number): Admission {
  return { ok: false, status, reason: HELLO_STATUS_TEXT[status] ?? `status ${status}` };
}
