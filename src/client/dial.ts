/**
 * Opening a connection to an export: TCP connect and the client's side of the
 * handshake. Errors say which address failed and what to check. The connect has its own
 * time limit (CONNECT_TIMEOUT_MS), so an address that drops packets fails in seconds,
 * like one that refuses, and a reconnect loop simply tries again. The handshake has one too
 * (HANDSHAKE_TIMEOUT_MS): an export that does not answer in time (stopped, overloaded) is
 * reported as that, not as a service that may not be a DST export.
 *
 * With a key the client speaks version 2 only (protocol README, "Version 2: keys"):
 * it names its key, checks the export's proof before it proves anything itself,
 * and refuses an export that answers without a proof (no downgrade). The connection
 * it returns is then the protected one.
 *
 * An NBD server (a `dst export --nbd` port, say) speaks first with "NBDMAGIC" where the
 * export's answer has its magic: the client says so at once, naming the port to use.
 * A DST export greets as NBD too, but only a connection silent for its 2 s grace; when
 * our hello came that late it answers it with HELLO_TOO_LATE after the greeting, and
 * the client connects once more (protocol README, "Negotiation").
 */

import { CONNECT_TIMEOUT_MS, HANDSHAKE_TIMEOUT_MS, NBD_GREETING_GRACE_MS } from "../constants.ts";
import { formatHostPort, type HostPort } from "../lib/address.ts";
import { assert } from "../lib/assert.ts";
import { type Clock, systemClock } from "../lib/clock.ts";
import { ConnectionClosedError, describeError, DstError } from "../lib/errors.ts";
import {
  AUTH_NONE,
  AUTH_PSK,
  CLIENT_ID_BYTES,
  ClientFeature,
  type ClientHello,
  decodeRefusalReasonLength,
  decodeServerHello,
  decodeServerKeyShare,
  encodeClientHello,
  encodeClientKeyShare,
  encodeClientProof,
  HELLO_STATUS_TEXT,
  type HelloExpectation,
  HelloStatus,
  MAGIC_SERVER_HELLO,
  MAGIC_SERVER_KEY_SHARE,
  NONCE_BYTES,
  PROTECTION_ENCRYPT,
  PROTECTION_MAC,
  PROTECTION_NONE,
  PROTOCOL_VERSION,
  PROTOCOL_VERSION_KEYED,
  type ServerHello,
  ServerHelloLayout,
  ServerKeyShareLayout,
} from "../protocol/mod.ts";
import { type ByteConn, closeQuietly, readExact, writeAll } from "../transport/byte_conn.ts";
import {
  checkProof,
  deriveChannelKeys,
  makeEphemeral,
  makeProof,
  sharedSecret,
  transcriptHash,
} from "../transport/channel_keys.ts";
import { SecureConn } from "../transport/secure_conn.ts";
import type { Key } from "../lib/key_file.ts";
import { GreetingLayout, IHAVEOPT, NBDMAGIC } from "../nbd/wire.ts";
import { printable } from "../lib/printable.ts";

/**
 * Opens a byte stream to `address`. `signal` aborts when the caller gave up (the connect
 * time ran out); a dialer that ignores it may still connect, and the caller closes that.
 */
export type Dialer = (address: HostPort, signal?: AbortSignal) => Promise<ByteConn>;

export const tcpDialer: Dialer = async (address, signal) => {
  const conn = await Deno.connect({ hostname: address.hostname, port: address.port, signal });
  conn.setNoDelay(true);
  return conn;
};

export interface Link {
  conn: ByteConn;
  hello: ServerHello;
}

export interface DialOptions {
  dial?: Dialer;
  /** Where the handshake's time limit runs (default the system's clock). */
  clock?: Clock;
  /**
   * Declares the client a writer: the export grants it the writer lease (or refuses)
   * and starts a write generation for it at once, reported in the hello.
   */
  writer?: boolean;
  /** The client's identity, the same on each of its connections (default: anonymous, zeros). */
  clientId?: Uint8Array;
  /** Prove this key (protocol version 2); without one, version 1 and no protection. */
  key?: Key;
}

/**
 * The export could not prove the key, or answered a keyed client without keys.
 * Retrying cannot help: the key files differ.
 */
export class AuthenticationFailed extends DstError {
  override name = "AuthenticationFailed";
  constructor(message: string) {
    super("AUTHENTICATION", message);
  }
}

/** The export refused the handshake; `status` is its HelloStatus, the message its reason. */
export class HandshakeRefused extends DstError {
  override name = "HandshakeRefused";
  constructor(readonly status: number, message: string) {
    super(status === HelloStatus.WRITE_LEASE_HELD ? "WRITE_LEASE_HELD" : "HANDSHAKE", message);
  }
}

/**
 * The export took the connection for an NBD client's, our hello having come after its
 * NBD_GREETING_GRACE_MS (a loaded machine, a slow link); another connection may pass.
 */
export class HelloTooLate extends DstError {
  override name = "HelloTooLate";
  constructor(message: string) {
    super("HELLO_TOO_LATE", message);
  }
}

/**
 * Connects and runs the handshake; the returned hello has status OK. A refusal
 * throws HandshakeRefused with the export's own reason. A connection the export took
 * for an NBD client's, our hello being late, is tried once more.
 */
export async function dialExport(address: HostPort, options: DialOptions = {}): Promise<Link> {
  const where = formatHostPort(address);
  try {
    return await dialOnce(address, where, options);
  } catch (error) {
    if (!(error instanceof HelloTooLate)) throw error;
  }
  try {
    return await dialOnce(address, where, options);
  } catch (error) {
    if (!(error instanceof HelloTooLate)) throw error;
    throw new HelloTooLate(
      `${where} is a DST export, but took our connection for an NBD client's, twice: our ` +
        `hello reached it more than ${NBD_GREETING_GRACE_MS / 1000} s after connecting ` +
        `(a loaded machine, or a slow link?)`,
    );
  }
}

/** Where a connection goes, and when its connect began (a DST export never greets as NBD before the grace). */
interface Dialing {
  where: string;
  clock: Clock;
  startedMs: number;
}

async function dialOnce(address: HostPort, where: string, options: DialOptions): Promise<Link> {
  const clock = options.clock ?? systemClock;
  // From before the connect: the export greets as NBD no sooner than the grace after it
  // accepted, and it may accept long before this process sees the connect done (a
  // stalled event loop). A slow connect to a real NBD server then only costs reading on.
  const dialing: Dialing = { where, clock, startedMs: clock.nowMs() };
  let conn = await connect(address, where, options.dial ?? tcpDialer, clock);
  let timedOut = false;
  const timer = clock.after(HANDSHAKE_TIMEOUT_MS, () => {
    timedOut = true;
    closeQuietly(conn);
  });
  try {
    const helloOut: ClientHello = {
      versionMin: options.key ? PROTOCOL_VERSION_KEYED : PROTOCOL_VERSION,
      versionMax: options.key ? PROTOCOL_VERSION_KEYED : PROTOCOL_VERSION,
      features: options.writer ? ClientFeature.WRITER : 0,
      authMethods: options.key ? AUTH_PSK : AUTH_NONE,
      protections: options.key ? PROTECTION_MAC | PROTECTION_ENCRYPT : PROTECTION_NONE,
      nonce: crypto.getRandomValues(new Uint8Array(NONCE_BYTES)),
      clientId: options.clientId ?? new Uint8Array(CLIENT_ID_BYTES),
    };
    const channel = options.key
      ? await authenticate(conn, dialing, helloOut, options.key)
      : await plain(conn, dialing, helloOut);
    const bytes = new Uint8Array(ServerHelloLayout.SIZE);
    bytes.set(channel.helloStart);
    await readExact(channel.conn, bytes.subarray(channel.helloStart.length));
    const hello = decodeServerHello(bytes, channel.expect);
    if (typeof hello === "string") throw new DstError("HANDSHAKE", `${where}: ${hello}`);
    // Unproven, a plain hello is believed only for what a keyed export says in the
    // clear; anything else (OK, or a refusal such as WRITE_LEASE_HELD, which would make
    // a writer give up) is someone without the key answering for it.
    if (channel.downgraded && !PLAIN_REFUSALS.has(hello.status)) {
      throw new AuthenticationFailed(
        `${where} answered without proving key "${options.key!.name}": it runs without ` +
          `keys, or something between us removed them; not connecting (give the export ` +
          `--key with the same key file, or connect without --key)`,
      );
    }
    if (hello.status !== HelloStatus.OK) {
      const why = await readRefusalReason(channel.conn) ??
        HELLO_STATUS_TEXT[hello.status] ?? `status ${hello.status}`;
      throw new HandshakeRefused(
        hello.status,
        `${where} refused the connection: ${printable(why)}`,
      );
    }
    conn = channel.conn;
    return { conn, hello };
  } catch (error) {
    closeQuietly(conn);
    // Our own timer closed it: the export is slow to answer (stopped, overloaded), and
    // whether it is a DST export at all is not in question. First: what failed after is
    // only the closed connection.
    if (timedOut) {
      throw new DstError(
        "HANDSHAKE",
        `Handshake with ${where} failed: no answer within ${HANDSHAKE_TIMEOUT_MS / 1000} s ` +
          `(is the export stopped or overloaded?)`,
        { cause: error },
      );
    }
    // Errors of our own already name the export; a connection that just ended does not.
    if (error instanceof DstError && !(error instanceof ConnectionClosedError)) throw error;
    throw new DstError(
      "HANDSHAKE",
      `Handshake with ${where} failed: ${
        describeError(error)
      } (is it a DST export, not NBD or another service?)`,
      { cause: error },
    );
  } finally {
    timer.cancel();
  }
}

/**
 * The connect, within CONNECT_TIMEOUT_MS: a host that is down or behind a firewall that
 * drops packets never answers, and the kernel would resend the SYN for two minutes.
 * A connection that completes after the time ran out is closed.
 */
function connect(address: HostPort, where: string, dial: Dialer, clock: Clock): Promise<ByteConn> {
  const { promise, resolve, reject } = Promise.withResolvers<ByteConn>();
  const abort = new AbortController();
  const timer = clock.after(CONNECT_TIMEOUT_MS, () => {
    abort.abort();
    reject(
      new DstError(
        "CONNECT",
        `Cannot connect to ${where}: no answer within ${CONNECT_TIMEOUT_MS / 1000} s (is the ` +
          `host up, its name resolving, and is a firewall dropping its packets?)`,
      ),
    );
  });
  // Through then(): a dialer that throws at once is reported as one that rejects.
  Promise.resolve().then(() => dial(address, abort.signal)).then(
    (conn) => {
      timer.cancel();
      if (abort.signal.aborted) closeQuietly(conn);
      else resolve(conn);
    },
    (error) => {
      timer.cancel();
      reject(
        new DstError(
          "CONNECT",
          `Cannot connect to ${where}: ${describeError(error)} (is \`dst export\` running there?)`,
          { cause: error },
        ),
      );
    },
  );
  return promise;
}

/**
 * The refusals a keyed export sends in the clear, before any proof (protocol README,
 * "Negotiation"): a keyed client believes a plain hello for these only. They change
 * nothing on the client; every other status comes inside the protected records.
 */
const PLAIN_REFUSALS = new Set<number>([
  HelloStatus.VERSION_UNSUPPORTED,
  HelloStatus.AUTH_UNSUPPORTED,
  HelloStatus.PROTECTION_UNSUPPORTED,
  HelloStatus.ACCESS_DENIED,
]);

/** Where the server hello comes from, and what it may choose. */
interface Channel {
  conn: ByteConn;
  /** Bytes of the server hello already read (its start, read to check what answered). */
  helloStart: Uint8Array;
  expect: HelloExpectation;
  /** A keyed client got a plain server hello: only a refusal is believed from it. */
  downgraded: boolean;
}

async function plain(conn: ByteConn, dialing: Dialing, hello: ClientHello): Promise<Channel> {
  await writeAll(conn, encodeClientHello(hello));
  return {
    conn,
    helloStart: await answerStart(conn, dialing),
    expect: { version: PROTOCOL_VERSION, authMethod: AUTH_NONE, protections: PROTECTION_NONE },
    downgraded: false,
  };
}

/**
 * Version 2's key exchange: send the hello and key share, check the export's proof
 * of the key before sending the client's own, then run over protected records.
 * An export without keys answers with a plain server hello instead; its refusal is
 * reported, anything else is a downgrade and refused.
 */
async function authenticate(
  conn: ByteConn,
  dialing: Dialing,
  hello: ClientHello,
  key: Key,
): Promise<Channel> {
  const where = dialing.where;
  const own = await makeEphemeral();
  const helloBytes = encodeClientHello(hello);
  const shareBytes = encodeClientKeyShare({ publicKey: own.publicKey, keyName: key.name });
  const out = new Uint8Array(helloBytes.length + shareBytes.length);
  out.set(helloBytes);
  out.set(shareBytes, helloBytes.length);
  await writeAll(conn, out);

  const start = await answerStart(conn, dialing);
  const magic = new DataView(start.buffer).getUint32(0, true);
  if (magic === MAGIC_SERVER_HELLO) {
    return {
      conn,
      helloStart: start,
      // Only its status is believed; an OK is a downgrade (checked by the caller).
      expect: { version: PROTOCOL_VERSION, authMethod: AUTH_NONE, protections: PROTECTION_NONE },
      downgraded: true,
    };
  }
  if (magic !== MAGIC_SERVER_KEY_SHARE) {
    throw new DstError("HANDSHAKE", `${where}: not a DST export (bad answer to the key share)`);
  }
  const shareIn = new Uint8Array(ServerKeyShareLayout.SIZE);
  shareIn.set(start);
  await readExact(conn, shareIn.subarray(start.length));
  const serverShare = decodeServerKeyShare(shareIn);
  if (typeof serverShare === "string") throw new DstError("HANDSHAKE", `${where}: ${serverShare}`);
  const secret = await sharedSecret(own, serverShare.publicKey);
  const transcript = await transcriptHash(
    helloBytes,
    shareBytes,
    shareIn.subarray(0, ServerKeyShareLayout.proof),
  );
  const keys = await deriveChannelKeys(key.bytes.slice(), secret, transcript);
  if (!await checkProof(keys, transcript, "server", serverShare.proof)) {
    throw new AuthenticationFailed(
      `${where} could not prove it holds key "${key.name}" (fingerprint ${key.fingerprint}): ` +
        `its key by that name differs, or it has no key by that name; both key files must ` +
        `hold the same line (compare the fingerprints \`dst keygen\` printed)`,
    );
  }
  await writeAll(conn, encodeClientProof(await makeProof(keys, transcript, "client")));
  return {
    conn: new SecureConn(conn, {
      protection: serverShare.protection,
      sendKey: keys.clientToServer,
      receiveKey: keys.serverToClient,
      peer: `the export at ${where}`,
    }),
    helloStart: new Uint8Array(0),
    expect: {
      version: PROTOCOL_VERSION_KEYED,
      authMethod: AUTH_PSK,
      protections: serverShare.protection,
    },
    downgraded: false,
  };
}

/** How much of the export's answer is read first: its magic, and enough to tell NBDMAGIC. */
const ANSWER_START_BYTES = 8;
assert(
  ANSWER_START_BYTES <= Math.min(ServerHelloLayout.SIZE, ServerKeyShareLayout.SIZE),
  "the start read is part of either answer",
);

/**
 * The first bytes of the export's answer (a server hello or key share, both longer); an
 * NBD server's greeting starts with NBDMAGIC there, and is named as what it is, unless
 * it is a DST export's that took us for an NBD client (HelloTooLate).
 */
async function answerStart(conn: ByteConn, dialing: Dialing): Promise<Uint8Array<ArrayBuffer>> {
  const start = new Uint8Array(ANSWER_START_BYTES);
  await readExact(conn, start);
  if (new DataView(start.buffer).getBigUint64(0) === NBDMAGIC) {
    const where = dialing.where;
    const afterMs = dialing.clock.nowMs() - dialing.startedMs;
    const greeting = await greetedLate(conn, dialing);
    if (greeting === "late hello") {
      throw new HelloTooLate(
        `${where} is a DST export, but took our connection for an NBD client's: our hello ` +
          `reached it more than ${NBD_GREETING_GRACE_MS / 1000} s after connecting`,
      );
    }
    if (greeting === "then nothing") {
      // Which of the two it was, nothing on the wire tells: say both.
      throw new DstError(
        "HANDSHAKE",
        `${where} greeted us as an NBD server only ${(afterMs / 1000).toFixed(1)} s after we ` +
          "connected, then closed: an NBD server slow to greet, or a DST export that took " +
          "our hello, late, for an NBD client's (a loaded machine, or a slow link?)",
      );
    }
    throw new DstError(
      "HANDSHAKE",
      `${where} is an NBD server, not a DST export: point dst at the export's DST port ` +
        `(--listen), or use an NBD client there`,
    );
  }
  return start;
}

/** The NBD greeting's bytes after NBDMAGIC (IHAVEOPT, handshake flags), then a server hello. */
const LATE_ANSWER_BYTES = GreetingLayout.SIZE - GreetingLayout.ihaveopt + ServerHelloLayout.SIZE;
assert(GreetingLayout.ihaveopt === ANSWER_START_BYTES, "NBDMAGIC is the start read");

/**
 * After NBDMAGIC: whether a DST export sent it, having taken us for an NBD client
 * because our hello came after its NBD_GREETING_GRACE_MS of silence. Such an export
 * greets only that long after our connect began, and answers our hello, after the
 * greeting, with a server hello of status HELLO_TOO_LATE, which no NBD server sends.
 * A greeting sooner than that is an NBD server's, and nothing more is read; a later one
 * is read on until that hello, or until the server closes (an NBD server drops a client
 * whose flags, our hello's magic, it does not know) or the handshake's time runs out.
 */
async function greetedLate(
  conn: ByteConn,
  dialing: Dialing,
): Promise<"nbd server" | "late hello" | "then nothing"> {
  if (dialing.clock.nowMs() - dialing.startedMs < NBD_GREETING_GRACE_MS) return "nbd server";
  const rest = new Uint8Array(LATE_ANSWER_BYTES);
  try {
    await readExact(conn, rest);
  } catch {
    return "then nothing"; // closed, or our time ran out (dialOnce says which)
  }
  const view = new DataView(rest.buffer);
  const hello = GreetingLayout.SIZE - GreetingLayout.ihaveopt;
  const tooLate = view.getBigUint64(0) === IHAVEOPT &&
    view.getUint32(hello + ServerHelloLayout.magic, true) === MAGIC_SERVER_HELLO &&
    view.getUint16(hello + ServerHelloLayout.status, true) === HelloStatus.HELLO_TOO_LATE;
  return tooLate ? "late hello" : "nbd server";
}

/** The reason after a refused hello, or null when the export sent none (it closed). */
async function readRefusalReason(conn: ByteConn): Promise<string | null> {
  try {
    const lengthBytes = new Uint8Array(2);
    await readExact(conn, lengthBytes);
    const length = decodeRefusalReasonLength(lengthBytes);
    if (typeof length === "string") return null;
    const text = new Uint8Array(length);
    await readExact(conn, text);
    return new TextDecoder().decode(text);
  } catch {
    return null;
  }
}
