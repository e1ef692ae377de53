/**
 * `--key`, `--key-name` and `--protect`: loading a key file for the side that
 * connects (one key) and for the side that serves (every key in the file, reloaded
 * on SIGHUP). Only fingerprints are ever printed.
 */

import { UsageError } from "../lib/errors.ts";
import { formatBytes, parseSize } from "../lib/units.ts";
import { MEMORY_BUDGET_BYTES_DEFAULT, MEMORY_BUDGET_BYTES_MIN } from "../constants.ts";
import { type Key, keyByName, loadKeyFile } from "../lib/key_file.ts";
import { PROTECTION_ENCRYPT, PROTECTION_MAC } from "../protocol/mod.ts";
import type { OptionSpec, Parsed } from "./args.ts";
import { AccessPolicy, parseAllowRule } from "../lib/allow_rules.ts";

/** Options of every command that connects to an export. */
export const CLIENT_KEY_OPTIONS: OptionSpec = {
  key: { type: "string" },
  "key-name": { type: "string" },
};

export const CLIENT_KEY_HELP =
  `  --key FILE      prove a key from FILE (made with \`dst keygen\`): the connection is then
                  authenticated both ways and every record protected; an export with keys
                  refuses clients without, and this client refuses an export that cannot
                  prove the key
  --key-name NAME the key of FILE to use (default: its first)`;

/** Options of the commands that serve (export, array). */
export const SERVE_KEY_OPTIONS: OptionSpec = {
  memory: { type: "string" },
  key: { type: "string" },
  protect: { type: "string" },
  allow: { type: "string", multiple: true },
};

export const SERVE_KEY_HELP =
  `  --memory SIZE   memory for request payloads that all DST clients share (default
                  ${formatBytes(MEMORY_BUDGET_BYTES_DEFAULT)}); past it, clients wait
  --key FILE      require every client to prove one of the keys in FILE (made with
                  \`dst keygen\`); SIGHUP rereads FILE, closing connections whose key was
                  removed. Without --key, anyone who reaches the port may read and write
  --protect MODE  with --key: encrypt (AES-256-GCM, the default) or mac (HMAC-SHA-256:
                  tamper-proof but readable on the wire)
  --allow [KEYNAME@]CIDR[=ro|rw|admin]
                  who may connect, and do what (repeatable; the first rule that matches
                  the client's address, and its key when the rule names one, wins; ro:
                  reads only; admin: also \`dst array detach/attach\`). With any --allow,
                  everyone else is refused before the handshake costs anything. Without
                  it: rw for all, admin from this machine only`;

/** --memory SIZE: the payload memory an export's DST clients share. */
export function memoryOption(parsed: Parsed, command: string): number {
  const text = stringValue(parsed, "memory");
  if (text === undefined) return MEMORY_BUDGET_BYTES_DEFAULT;
  const bytes = parseSize(text, "--memory");
  if (bytes < MEMORY_BUDGET_BYTES_MIN) {
    throw new UsageError(
      `--memory ${text} is below ${formatBytes(MEMORY_BUDGET_BYTES_MIN)}, ` +
        "the largest request",
      command,
    );
  }
  return bytes;
}

/** The --allow rules given (repeatable), as a policy; none: rw for all, admin from loopback. */
export function accessPolicy(parsed: Parsed): AccessPolicy {
  const given = parsed.values.allow;
  const texts = Array.isArray(given) ? given : typeof given === "string" ? [given] : [];
  return new AccessPolicy(texts.map(parseAllowRule));
}

/** The key a connecting command proves, or undefined without --key. */
export async function clientKey(parsed: Parsed, command: string): Promise<Key | undefined> {
  const path = stringValue(parsed, "key");
  const name = stringValue(parsed, "key-name");
  if (path === undefined) {
    if (name !== undefined) throw new UsageError(`--key-name goes with --key FILE`, command);
    return undefined;
  }
  return keyByName(await loadKeyFile(path), name);
}

/**
 * The keys a serving command accepts: the file's keys as of the last (re)load.
 * reload() rereads the file; a file that became unsafe or empty keeps the old keys
 * (and throws, for the caller to log), so a typo never locks every client out.
 */
export class KeyRing {
  #keys: readonly Key[];

  private constructor(readonly path: string, keys: readonly Key[]) {
    this.#keys = keys;
  }

  static async load(path: string): Promise<KeyRing> {
    return new KeyRing(path, (await loadKeyFile(path)).keys);
  }

  get keys(): readonly Key[] {
    return this.#keys;
  }

  /** Rereads the file; returns the keys removed (by name and fingerprint). */
  async reload(): Promise<{ added: Key[]; removed: Key[] }> {
    const fresh = (await loadKeyFile(this.path)).keys;
    const same = (a: Key, b: Key) => a.name === b.name && a.fingerprint === b.fingerprint;
    const added = fresh.filter((key) => !this.#keys.some((old) => same(old, key)));
    const removed = this.#keys.filter((old) => !fresh.some((key) => same(old, key)));
    this.#keys = fresh;
    return { added, removed };
  }

  /** One line for logs: names and fingerprints. */
  describe(): string {
    return this.#keys.map((key) => `${key.name} (${key.fingerprint})`).join(", ");
  }
}

export interface ServeKeys {
  ring: KeyRing;
  protection: number;
}

/** A serving command's keys and protection, or undefined without --key. */
export async function serveKeys(parsed: Parsed, command: string): Promise<ServeKeys | undefined> {
  const path = stringValue(parsed, "key");
  const protect = stringValue(parsed, "protect");
  if (path === undefined) {
    if (protect !== undefined) {
      throw new UsageError(`--protect goes with --key FILE`, command);
    }
    return undefined;
  }
  let protection: number;
  if (protect === undefined || protect === "encrypt") protection = PROTECTION_ENCRYPT;
  else if (protect === "mac") protection = PROTECTION_MAC;
  else {
    throw new UsageError(
      `--protect ${JSON.stringify(protect)} is not encrypt or mac`,
      command,
    );
  }
  return { ring: await KeyRing.load(path), protection };
}

function stringValue(parsed: Parsed, name: string): string | undefined {
  const value = parsed.values[name];
  return typeof value === "string" ? value : undefined;
}
