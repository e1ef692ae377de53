/**
 * The NBD handshake, fixed newstyle only (doc/proto.md, "Fixed newstyle negotiation"):
 * greet, read the client's flags, then answer options until the client picks the
 * export with EXPORT_NAME or GO. Supported: EXPORT_NAME, INFO, GO, LIST, ABORT,
 * STRUCTURED_REPLY. Every other option (STARTTLS, EXTENDED_HEADERS, meta contexts
 * included) gets ERR_UNSUP and negotiation goes on, as qemu and libnbd expect.
 *
 * Bounds: OPTIONS_MAX options per connection, OPTION_BYTES_MAX per option, and the
 * whole handshake within HANDSHAKE_TIMEOUT_MS; past any of them the connection is
 * closed with one log line. A DST client at this port sends its hello where the client
 * flags belong; it is named in that line, with the port it should use.
 *
 * refuseOptions() is the other use of this phase: the DST export's answer to an NBD
 * client that reached its port instead of this one.
 */

import { HANDSHAKE_TIMEOUT_MS } from "../constants.ts";
import type { Logger } from "../lib/log.ts";
import { MAGIC_CLIENT_HELLO } from "../protocol/mod.ts";
import { type ByteConn, readExact, writeAll } from "../transport/byte_conn.ts";
import {
  BLOCK_SIZE_MAX,
  BLOCK_SIZE_MIN,
  BLOCK_SIZE_PREFERRED,
  ClientFlag,
  encodeGreeting,
  encodeOptionReply,
  IHAVEOPT,
  Info,
  Option,
  OPTION_NAMES,
  OptionReply,
} from "./wire.ts";

/** Options one client may send before it must pick the export: qemu and libnbd send fewer than 10. */
const OPTIONS_MAX = 64;
/** An option's data: an export name is at most 4096 bytes, plus a few info requests. */
const OPTION_BYTES_MAX = 8192;
const NO_ZEROES_PAD = 124;

export interface NbdExport {
  /** Clients may ask for this name or for "" (the default export). */
  name: string;
  description: string;
  sizeBytes: number;
  transmissionFlags: number;
}

export interface Negotiated {
  structuredReplies: boolean;
}

/** Runs the handshake; returns null when the client left or was turned away (already logged). */
export async function negotiate(
  conn: ByteConn,
  exported: NbdExport,
  peer: string,
  log: Logger,
): Promise<Negotiated | null> {
  let timedOut = false;
  const timer = setTimeout(() => {
    timedOut = true;
    conn.close();
  }, HANDSHAKE_TIMEOUT_MS);
  try {
    return await haggle(conn, exported, peer, log);
  } catch (error) {
    const why = timedOut ? `no export chosen within ${HANDSHAKE_TIMEOUT_MS} ms` : String(error);
    log.debug(`${peer}: NBD handshake ended: ${why}`);
    return null;
  } finally {
    clearTimeout(timer);
  }
}

async function haggle(
  conn: ByteConn,
  exported: NbdExport,
  peer: string,
  log: Logger,
): Promise<Negotiated | null> {
  await writeAll(conn, encodeGreeting());

  const flagBytes = new Uint8Array(4);
  await readExact(conn, flagBytes);
  const clientFlags = new DataView(flagBytes.buffer).getUint32(0);
  // A DST client sends its hello without waiting for a greeting, and fails on our
  // NBDMAGIC: all that is left is to tell the operator which port it should have used.
  if (new DataView(flagBytes.buffer).getUint32(0, true) === MAGIC_CLIENT_HELLO) {
    log.warn(
      `${peer}: a DST client at the NBD port (it sent the DST hello "DSTC"): DST clients ` +
        `connect to the export's --listen port; closing`,
    );
    return null;
  }
  if ((clientFlags & ~(ClientFlag.FIXED_NEWSTYLE | ClientFlag.NO_ZEROES)) !== 0) {
    log.warn(
      `${peer}: NBD client flags 0x${clientFlags.toString(16)} include unknown bits; closing`,
    );
    return null;
  }
  if ((clientFlags & ClientFlag.FIXED_NEWSTYLE) === 0) {
    log.warn(`${peer}: NBD client does not speak fixed newstyle, the only style served; closing`);
    return null;
  }
  const noZeroes = (clientFlags & ClientFlag.NO_ZEROES) !== 0;
  const negotiated: Negotiated = { structuredReplies: false };
  const header = new Uint8Array(16);
  const headerView = new DataView(header.buffer);

  for (let count = 0; count < OPTIONS_MAX; count++) {
    await readExact(conn, header);
    if (headerView.getBigUint64(0) !== IHAVEOPT) {
      log.warn(`${peer}: NBD option without the IHAVEOPT magic; closing`);
      return null;
    }
    const option = headerView.getUint32(8);
    const length = headerView.getUint32(12);
    if (length > OPTION_BYTES_MAX) {
      log.warn(
        `${peer}: NBD option ${
          OPTION_NAMES[option] ?? option
        } of ${length} bytes > ${OPTION_BYTES_MAX}; closing`,
      );
      return null;
    }
    const data = new Uint8Array(length);
    await readExact(conn, data);
    const reply = (type: number, payload: Uint8Array = new Uint8Array()) =>
      sendOptionReply(conn, option, type, payload);
    const refuse = (type: number, message: string) =>
      reply(type, new TextEncoder().encode(message));

    switch (option) {
      case Option.EXPORT_NAME: {
        const name = new TextDecoder().decode(data);
        if (!knownName(exported, name)) {
          log.warn(`${peer}: NBD client asked for unknown export "${name}"; closing`);
          return null; // EXPORT_NAME has no error reply: the spec says to close
        }
        const tail = new DataView(new ArrayBuffer(10 + (noZeroes ? 0 : NO_ZEROES_PAD)));
        tail.setBigUint64(0, BigInt(exported.sizeBytes));
        tail.setUint16(8, exported.transmissionFlags);
        await writeAll(conn, new Uint8Array(tail.buffer));
        return negotiated;
      }
      case Option.ABORT:
        await reply(OptionReply.ACK).catch(() => {});
        return null;
      case Option.LIST: {
        if (length !== 0) {
          await refuse(OptionReply.ERR_INVALID, "LIST takes no data");
          break;
        }
        const name = new TextEncoder().encode(exported.name);
        const entry = new Uint8Array(4 + name.length);
        new DataView(entry.buffer).setUint32(0, name.length);
        entry.set(name, 4);
        await reply(OptionReply.SERVER, entry);
        await reply(OptionReply.ACK);
        break;
      }
      case Option.STRUCTURED_REPLY:
        if (length !== 0) {
          await refuse(OptionReply.ERR_INVALID, "STRUCTURED_REPLY takes no data");
          break;
        }
        negotiated.structuredReplies = true;
        await reply(OptionReply.ACK);
        break;
      case Option.INFO:
      case Option.GO: {
        const request = parseInfoRequest(data);
        if (typeof request === "string") {
          await refuse(OptionReply.ERR_INVALID, request);
          break;
        }
        if (!knownName(exported, request.name)) {
          await refuse(OptionReply.ERR_UNKNOWN, `no export named "${request.name}"`);
          break;
        }
        await reply(OptionReply.INFO, infoExport(exported));
        if (request.infos.includes(Info.BLOCK_SIZE)) await reply(OptionReply.INFO, infoBlockSize());
        if (request.infos.includes(Info.NAME)) {
          await reply(OptionReply.INFO, infoText(Info.NAME, exported.name));
        }
        if (request.infos.includes(Info.DESCRIPTION)) {
          await reply(OptionReply.INFO, infoText(Info.DESCRIPTION, exported.description));
        }
        await reply(OptionReply.ACK);
        if (option === Option.GO) return negotiated;
        break;
      }
      default:
        await refuse(
          OptionReply.ERR_UNSUP,
          `option ${OPTION_NAMES[option] ?? option} is not supported`,
        );
    }
  }
  log.warn(`${peer}: more than ${OPTIONS_MAX} NBD options without choosing an export; closing`);
  return null;
}

/**
 * Answers an NBD client that reached a port serving something else (the DST export's,
 * once it has greeted the client and read its flags): every option is refused with
 * `message`, so the client prints it whichever option it reports. An option that asks
 * for a feature (STRUCTURED_REPLY, EXTENDED_HEADERS, ...) gets ERR_UNSUP, from which
 * clients go on to ask for the export; asking for the export (GO, INFO, LIST) gets
 * ERR_POLICY, as libnbd answers an ERR_UNSUP to GO by falling back to EXPORT_NAME,
 * which has no error reply. It ends when the client aborts or leaves, at EXPORT_NAME
 * (the connection is then closed, as the spec says), or after OPTIONS_MAX options.
 * Returns the names of the options the client sent, for the caller's log line.
 */
export async function refuseOptions(conn: ByteConn, message: string): Promise<string[]> {
  const text = new TextEncoder().encode(message);
  const header = new Uint8Array(16);
  const headerView = new DataView(header.buffer);
  const seen: string[] = [];
  try {
    while (seen.length < OPTIONS_MAX) {
      await readExact(conn, header);
      if (headerView.getBigUint64(0) !== IHAVEOPT) break;
      const option = headerView.getUint32(8);
      const length = headerView.getUint32(12);
      seen.push(OPTION_NAMES[option] ?? String(option));
      if (length > OPTION_BYTES_MAX || option === Option.EXPORT_NAME) break;
      await readExact(conn, new Uint8Array(length));
      if (option === Option.ABORT) {
        await sendOptionReply(conn, option, OptionReply.ACK, new Uint8Array());
        break;
      }
      const asksForExport = option === Option.GO || option === Option.INFO ||
        option === Option.LIST;
      const type = asksForExport ? OptionReply.ERR_POLICY : OptionReply.ERR_UNSUP;
      await sendOptionReply(conn, option, type, text);
    }
  } catch {
    // The client left, or the handshake's time ran out: what it sent is reported.
  }
  return seen;
}

function knownName(exported: NbdExport, name: string): boolean {
  return name === "" || name === exported.name;
}

function parseInfoRequest(data: Uint8Array): { name: string; infos: number[] } | string {
  const view = new DataView(data.buffer, data.byteOffset, data.byteLength);
  if (data.length < 6) return "INFO/GO data is shorter than 6 bytes";
  const nameLength = view.getUint32(0);
  if (nameLength > data.length - 6) return "INFO/GO name length runs past the option";
  const count = view.getUint16(4 + nameLength);
  if (data.length !== 6 + nameLength + 2 * count) {
    return "INFO/GO length does not match its info requests";
  }
  const infos: number[] = [];
  for (let i = 0; i < count; i++) infos.push(view.getUint16(6 + nameLength + 2 * i));
  return { name: new TextDecoder().decode(data.subarray(4, 4 + nameLength)), infos };
}

function infoExport(exported: NbdExport): Uint8Array {
  const view = new DataView(new ArrayBuffer(12));
  view.setUint16(0, Info.EXPORT);
  view.setBigUint64(2, BigInt(exported.sizeBytes));
  view.setUint16(10, exported.transmissionFlags);
  return new Uint8Array(view.buffer);
}

function infoBlockSize(): Uint8Array {
  const view = new DataView(new ArrayBuffer(14));
  view.setUint16(0, Info.BLOCK_SIZE);
  view.setUint32(2, BLOCK_SIZE_MIN);
  view.setUint32(6, BLOCK_SIZE_PREFERRED);
  view.setUint32(10, BLOCK_SIZE_MAX);
  return new Uint8Array(view.buffer);
}

function infoText(type: number, text: string): Uint8Array {
  const encoded = new TextEncoder().encode(text);
  const bytes = new Uint8Array(2 + encoded.length);
  new DataView(bytes.buffer).setUint16(0, type);
  bytes.set(encoded, 2);
  return bytes;
}

async function sendOptionReply(
  conn: ByteConn,
  option: number,
  type: number,
  payload: Uint8Array,
): Promise<void> {
  await writeAll(conn, encodeOptionReply(option, type, payload));
}
