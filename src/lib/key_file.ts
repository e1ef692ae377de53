/**
 * Key files: the pre-shared keys that the serving and connecting sides will prove
 * to each other. One key a line, `NAME:HEX` (64 hex digits, 256 bits), the format
 * of gnutls' psktool, so one file can serve both tools. Comments (`#`) and blank
 * lines are allowed. Keys rotate by adding a line with a new name, never by
 * editing one.
 *
 * A key file is a secret, so it is read only when nobody else could have written
 * or read it: not through a symbolic link, owned by the current user, no group or
 * other permission bits. Every refusal says what to run, and no message ever
 * quotes a line of the file (it might be key material).
 */

import { KeyFileError } from "./errors.ts";
import { bytesToHex } from "./hex.ts";

/** A key's length: 256 bits, as AES-256-GCM and HMAC-SHA-256 want. */
export const KEY_BYTES = 32;

/** What a key name may be: also what goes on the wire and in logs, so plain and short. */
export const KEY_NAME_PATTERN = /^[A-Za-z0-9._-]{1,64}$/;

/** The rule for a key name, in words, for error messages. */
export const KEY_NAME_RULE = "1 to 64 characters of A-Z a-z 0-9 . _ -";

/**
 * The fingerprint's domain: the digest of the key bytes alone would be a hash of
 * the key that another protocol might also publish; a prefix of our own keeps the
 * fingerprint useless for anything but naming this key.
 */
const FINGERPRINT_PREFIX = new TextEncoder().encode("dst key fingerprint\0");

/** Hex digits of the fingerprint shown: 64 bits, enough to tell keys apart by eye. */
const FINGERPRINT_HEX_DIGITS = 16;

/** One key of a key file. Its bytes never show in logs, JSON or Deno.inspect. */
export class Key {
  /** @param line the line of the file it came from (1-based), for messages */
  constructor(
    readonly name: string,
    readonly bytes: Uint8Array,
    readonly fingerprint: string,
    readonly line: number,
  ) {}

  /** JSON.stringify shows the name and fingerprint, not the key. */
  toJSON(): { name: string; fingerprint: string } {
    return { name: this.name, fingerprint: this.fingerprint };
  }

  /** console.log and Deno.inspect show the name and fingerprint, not the key. */
  [Symbol.for("Deno.customInspect")](): string {
    return `Key(${this.name}, ${this.fingerprint})`;
  }
}

/** A loaded key file: its keys in file order (the first is the default). */
export interface KeyFile {
  path: string;
  keys: readonly Key[];
}

/**
 * The fingerprint of a key: the first 16 hex digits of
 * SHA-256("dst key fingerprint\0" || key bytes). Stable: both sides and the
 * README can name a key by it without showing the key.
 */
export async function keyFingerprint(bytes: Uint8Array): Promise<string> {
  const input = new Uint8Array(FINGERPRINT_PREFIX.length + bytes.length);
  input.set(FINGERPRINT_PREFIX);
  input.set(bytes, FINGERPRINT_PREFIX.length);
  const digest = await crypto.subtle.digest("SHA-256", input);
  return bytesToHex(new Uint8Array(digest)).slice(0, FINGERPRINT_HEX_DIGITS);
}

/** Whether `name` may name a key. */
export function isKeyName(name: string): boolean {
  return KEY_NAME_PATTERN.test(name);
}

/** A path as it would be typed in a shell command, for the commands error messages suggest. */
function shellWord(path: string): string {
  return /^[\w./@%+=:,-]+$/.test(path) ? path : `'${path.replaceAll("'", `'\\''`)}'`;
}

/**
 * Parses key file text. Throws KeyFileError for a malformed line (saying which and
 * why, never what it holds) or a name used twice. An empty result is not an error
 * here: loadKeyFile refuses it, keygen appends to it.
 */
export async function parseKeyFile(path: string, text: string): Promise<Key[]> {
  const keys: Key[] = [];
  const lineOf = new Map<string, number>();
  const lines = text.split("\n");
  for (let index = 0; index < lines.length; index++) {
    const number = index + 1;
    const line = lines[index]!.trim(); // also drops the \r of a file edited on Windows
    if (line === "" || line.startsWith("#")) continue;
    const where = `${path} line ${number}`;
    const colon = line.indexOf(":");
    if (colon < 0) {
      throw new KeyFileError(`${where}: expected NAME:HEX, found no ":"`);
    }
    const name = line.slice(0, colon);
    const hex = line.slice(colon + 1);
    if (!isKeyName(name)) {
      throw new KeyFileError(`${where}: the name must be ${KEY_NAME_RULE}`);
    }
    if (!/^[0-9a-fA-F]{64}$/.test(hex)) {
      throw new KeyFileError(
        `${where}: the key must be ${2 * KEY_BYTES} hex digits (${8 * KEY_BYTES} bits); ` +
          `make one with \`dst keygen ${shellWord(path)} --name NAME\``,
      );
    }
    const earlier = lineOf.get(name);
    if (earlier !== undefined) {
      throw new KeyFileError(
        `${where}: the name "${name}" is already used on line ${earlier}; each key needs its own name`,
      );
    }
    lineOf.set(name, number);
    const bytes = new Uint8Array(KEY_BYTES);
    for (let i = 0; i < KEY_BYTES; i++) bytes[i] = parseInt(hex.slice(2 * i, 2 * i + 2), 16);
    keys.push(new Key(name, bytes, await keyFingerprint(bytes), number));
  }
  return keys;
}

/** What the safety checks look at, from lstat or fstat (a subset of Deno.FileInfo). */
export interface KeyFileStat {
  isFile: boolean;
  isSymlink: boolean;
  uid: number | null;
  mode: number | null;
}

/**
 * Throws KeyFileError unless `stat` is a regular file (not a symbolic link) owned
 * by `uid` with no group or other permissions. Where the system reports no owner or
 * mode (Windows), there is nothing to check. Pure, so each refusal is testable
 * without root.
 */
export function checkKeyFileStat(path: string, stat: KeyFileStat, uid: number | null): void {
  const word = shellWord(path);
  if (stat.isSymlink) {
    throw new KeyFileError(
      `${path} is a symbolic link: a key file is read only from the file itself, so a link ` +
        `cannot swap the keys; give its real path (\`readlink -f ${word}\`)`,
    );
  }
  if (!stat.isFile) throw new KeyFileError(`${path} is not a regular file`);
  if (uid !== null && stat.uid !== null && stat.uid !== uid) {
    throw new KeyFileError(
      `${path} belongs to uid ${stat.uid}, not to you (uid ${uid}): a key file must be yours; ` +
        `run \`chown ${uid} ${word}\` as root, or make your own with \`dst keygen\``,
    );
  }
  if (stat.mode !== null && (stat.mode & 0o077) !== 0) {
    const mode = (stat.mode & 0o777).toString(8).padStart(4, "0");
    throw new KeyFileError(
      `${path} can be read or written by group or others (mode ${mode}): ` +
        `run \`chmod 600 ${word}\``,
    );
  }
}

/**
 * Opens `path` only if it is safe: lstat refuses a link before opening, and fstat
 * of what was opened must be that same file (a link swapped in between is caught)
 * and pass the checks again.
 */
async function openChecked(path: string, options: Deno.OpenOptions): Promise<Deno.FsFile> {
  let before: Deno.FileInfo;
  try {
    before = await Deno.lstat(path);
  } catch (error) {
    if (error instanceof Deno.errors.NotFound) {
      throw new KeyFileError(
        `${path}: no such key file; make one with \`dst keygen ${shellWord(path)}\``,
      );
    }
    throw new KeyFileError(`Cannot read the key file ${path}: ${error}`, { cause: error });
  }
  checkKeyFileStat(path, before, Deno.uid());
  const file = await Deno.open(path, options);
  try {
    const after = await file.stat();
    if (after.dev !== before.dev || after.ino !== before.ino) {
      throw new KeyFileError(`${path} was replaced while it was being opened; try again`);
    }
    checkKeyFileStat(path, { ...after, isSymlink: false }, Deno.uid());
    return file;
  } catch (error) {
    file.close();
    throw error;
  }
}

/** The whole content of an open file, from its start. */
async function readAll(file: Deno.FsFile): Promise<string> {
  await file.seek(0, Deno.SeekMode.Start);
  const chunks: Uint8Array[] = [];
  const buffer = new Uint8Array(4096);
  for (;;) {
    const n = await file.read(buffer);
    if (n === null) break;
    chunks.push(buffer.slice(0, n));
  }
  const bytes = new Uint8Array(chunks.reduce((sum, chunk) => sum + chunk.length, 0));
  let offset = 0;
  for (const chunk of chunks) {
    bytes.set(chunk, offset);
    offset += chunk.length;
  }
  return new TextDecoder().decode(bytes);
}

/**
 * Loads a key file for serving or connecting: its keys in file order. Refuses (with
 * what to run) a symbolic link, a file not the current user's, one that group or
 * others may read or write, a malformed line, a name used twice, and a file with
 * no key.
 */
export async function loadKeyFile(path: string): Promise<KeyFile> {
  const file = await openChecked(path, { read: true });
  let text: string;
  try {
    text = await readAll(file);
  } finally {
    file.close();
  }
  const keys = await parseKeyFile(path, text);
  if (keys.length === 0) {
    throw new KeyFileError(
      `${path} holds no keys; add one with \`dst keygen ${shellWord(path)} --name NAME\``,
    );
  }
  return { path, keys };
}

/**
 * The key named `name`, or the file's first key when no name is given. Throws
 * KeyFileError, listing the names there are, when there is no such key.
 */
export function keyByName(keyFile: KeyFile, name?: string): Key {
  const key = name === undefined
    ? keyFile.keys[0]
    : keyFile.keys.find((candidate) => candidate.name === name);
  if (key === undefined) {
    const names = keyFile.keys.map((k) => k.name).join(", ");
    throw new KeyFileError(
      name === undefined
        ? `${keyFile.path} holds no keys`
        : `${keyFile.path} has no key named "${name}" (it has: ${names})`,
    );
  }
  return key;
}

/** What keygen did: the new key's name and fingerprint, and the file it went to. */
export interface AddedKey {
  name: string;
  fingerprint: string;
  /** The file did not exist and was made (mode 0600). */
  created: boolean;
  /** Keys in the file now, the new one included. */
  keyCount: number;
}

/**
 * Adds a new random 256-bit key named `name` to the key file at `path`: creates
 * it (exclusively, mode 0600 whatever the umask, never through a link) or appends
 * to it after the same checks loadKeyFile makes. A name already in the file is
 * refused: keys rotate by adding a new name. The file is locked while it is read
 * and written, so two keygens at once cannot both add one name.
 */
export async function addKey(path: string, name: string): Promise<AddedKey> {
  if (!isKeyName(name)) {
    throw new KeyFileError(`The key name must be ${KEY_NAME_RULE}`);
  }
  let file: Deno.FsFile;
  let created = false;
  try {
    // createNew is O_CREAT|O_EXCL: it never follows a link, and fails if anything is there.
    file = await Deno.open(path, { createNew: true, read: true, append: true, mode: 0o600 });
    created = true;
  } catch (error) {
    if (!(error instanceof Deno.errors.AlreadyExists)) {
      throw new KeyFileError(`Cannot create the key file ${path}: ${error}`, { cause: error });
    }
    file = await openChecked(path, { read: true, append: true });
  }
  try {
    if (created) {
      // The umask may have taken the owner's bits too; it cannot have added others'.
      await Deno.chmod(path, 0o600);
      checkKeyFileStat(path, { ...await file.stat(), isSymlink: false }, Deno.uid());
    }
    // A creator locks too: an appender that opened the new file first must not race it.
    await file.lock(true);
    const text = await readAll(file);
    const keys = await parseKeyFile(path, text);
    const same = keys.find((key) => key.name === name);
    if (same !== undefined) {
      throw new KeyFileError(
        `${path} already has a key named "${name}" (line ${same.line}); keys rotate by adding ` +
          `one with a new name: \`dst keygen ${shellWord(path)} --name NEW-NAME\``,
      );
    }
    const bytes = crypto.getRandomValues(new Uint8Array(KEY_BYTES));
    const separator = text === "" || text.endsWith("\n") ? "" : "\n";
    const line = new TextEncoder().encode(`${separator}${name}:${bytesToHex(bytes)}\n`);
    for (let written = 0; written < line.length;) {
      written += await file.write(line.subarray(written));
    }
    await file.syncData();
    line.fill(0);
    return {
      name,
      fingerprint: await keyFingerprint(bytes),
      created,
      keyCount: keys.length + 1,
    };
  } finally {
    file.close();
  }
}
