/**
 * Access rules of `dst export` and `dst array`: the repeatable
 * `--allow [KEYNAME@]CIDR[=ro|rw|admin]`, parsed once at start, and the policy that
 * answers "may this peer connect at all?" and "with what access?".
 *
 * Owns IP address and CIDR parsing and containment. It does not own how a peer
 * proves its key name (the handshake does that) nor what each access level permits
 * (the server does).
 *
 * Every address lives in one 128-bit space: an IPv4 address is kept as its
 * IPv4-mapped IPv6 form (`::ffff:a.b.c.d`), and an IPv4 prefix /p as /(96 + p). So a
 * peer that a dual-stack socket reports as `::ffff:10.0.0.1` matches `10.0.0.0/8`
 * exactly as `10.0.0.1` does, and a rule's meaning never depends on which socket
 * the peer came in on.
 */

import { assert } from "./assert.ts";
import { UsageError } from "./errors.ts";
import { isKeyName, KEY_NAME_RULE } from "./key_file.ts";
import { printable } from "./printable.ts";

/** What a rule grants: read only, read and write, or read, write and administer. */
export type Access = "ro" | "rw" | "admin";

const ACCESSES: readonly Access[] = ["ro", "rw", "admin"];

/** A CIDR network as the user meant it; `address` is canonical and has no host bits. */
export interface Network {
  family: "ipv4" | "ipv6";
  /** Dotted IPv4, or IPv6 in the RFC 5952 form (lower case, longest zero run as `::`). */
  address: string;
  /** 0-32 for IPv4, 0-128 for IPv6. */
  prefixLength: number;
}

/** One `--allow` rule. `keyName` null matches any key and clients without one. */
export interface AllowRule {
  keyName: string | null;
  network: Network;
  access: Access;
}

/** The form of a rule, for error messages. */
export const ALLOW_RULE_FORM = "[KEYNAME@]CIDR[=ro|rw|admin], e.g. backup@10.0.0.0/24=ro";

const IPV4_BITS = 32;
const IPV6_BITS = 128;
const ADDRESS_MASK = (1n << BigInt(IPV6_BITS)) - 1n;
/** `::ffff:0:0/96`, where IPv4 addresses live in the one 128-bit space. */
const IPV4_MAPPED_BASE = 0xffffn << 32n;

/**
 * Parses one `--allow` value. A bare address is a /32 or /128 network; a missing
 * `=ACCESS` means rw. An IPv6 address may be bracketed (`[::1]`, `[fd00::]/8`).
 * Throws UsageError quoting the rule, saying what is wrong and the form to write.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { parseAllowRule } from "./allow_rules.ts";
 *
 * assert.deepEqual(parseAllowRule("backup@10.0.0.0/24=ro"), {
 *   keyName: "backup",
 *   network: { family: "ipv4", address: "10.0.0.0", prefixLength: 24 },
 *   access: "ro",
 * });
 * ```
 */
export function parseAllowRule(text: string): AllowRule {
  const bad = (why: string) =>
    new UsageError(`--allow "${printable(text)}": ${why}; write ${ALLOW_RULE_FORM}`);
  let rest = text;
  let access: Access = "rw";
  const equals = rest.lastIndexOf("=");
  if (equals >= 0) {
    const accessText = rest.slice(equals + 1);
    const found = ACCESSES.find((candidate) => candidate === accessText);
    if (found === undefined) {
      throw bad(`access "${printable(accessText)}" is not ro, rw or admin`);
    }
    access = found;
    rest = rest.slice(0, equals);
  }
  let keyName: string | null = null;
  const at = rest.indexOf("@");
  if (at >= 0) {
    keyName = rest.slice(0, at);
    if (!isKeyName(keyName)) {
      throw bad(`key name "${printable(keyName)}" is not ${KEY_NAME_RULE}`);
    }
    rest = rest.slice(at + 1);
  }
  if (rest === "") throw bad("the network is missing");
  const parsed = parseCidr(rest);
  if (typeof parsed === "string") throw bad(parsed);
  return { keyName, network: parsed, access };
}

/** A CIDR, or why it is not one (a phrase for parseAllowRule's message). */
function parseCidr(text: string): Network | string {
  const slash = text.indexOf("/");
  let addressText = slash >= 0 ? text.slice(0, slash) : text;
  const bracketed = /^\[(.*)\]$/.exec(addressText);
  if (bracketed !== null) addressText = bracketed[1]!;
  const address = parseAddress(addressText);
  if (address === null) {
    return `"${printable(addressText)}" is not an IPv4 or IPv6 address`;
  }
  if (bracketed !== null && address.family === "ipv4") {
    return `brackets hold only an IPv6 address, not "${addressText}"`;
  }
  const bits = address.family === "ipv4" ? IPV4_BITS : IPV6_BITS;
  let prefixLength = bits;
  if (slash >= 0) {
    const prefixText = text.slice(slash + 1);
    if (!/^\d{1,3}$/.test(prefixText)) {
      return `prefix length "${printable(prefixText)}" is not a number`;
    }
    prefixLength = Number(prefixText);
    if (prefixLength > bits) return `prefix length ${prefixLength} is not in 0-${bits}`;
  }
  const network = { family: address.family, prefixLength };
  const base = address.value & prefixMask(spacePrefixLength(network));
  if (base !== address.value) {
    const suggestion = formatAddress(base, address.family);
    return `${addressText} has bits set past the /${prefixLength} prefix; ` +
      `did you mean ${suggestion}/${prefixLength}?`;
  }
  return { ...network, address: formatAddress(base, address.family) };
}

/** An address in the 128-bit space, with the family it was written in. */
interface Address {
  family: "ipv4" | "ipv6";
  value: bigint;
}

/** Parses a dotted IPv4 or an IPv6 address (no brackets, no zone); null if neither. */
function parseAddress(text: string): Address | null {
  const ipv4 = parseIpv4(text);
  if (ipv4 !== null) return { family: "ipv4", value: IPV4_MAPPED_BASE | ipv4 };
  const ipv6 = parseIpv6(text);
  if (ipv6 !== null) return { family: "ipv6", value: ipv6 };
  return null;
}

/**
 * Four decimal parts 0-255. A part with a leading zero is refused: some tools read
 * it as octal, so `010.0.0.1` could mean 8.0.0.1 to them and 10.0.0.1 to us.
 */
function parseIpv4(text: string): bigint | null {
  const parts = text.split(".");
  if (parts.length !== 4) return null;
  let value = 0n;
  for (const part of parts) {
    if (!/^(0|[1-9]\d{0,2})$/.test(part)) return null;
    const byte = Number(part);
    if (byte > 255) return null;
    value = (value << 8n) | BigInt(byte);
  }
  return value;
}

/** Eight groups of 1-4 hex digits, one `::` for a run of zero groups, a dotted IPv4 tail. */
function parseIpv6(text: string): bigint | null {
  const halves = text.split("::");
  if (halves.length > 2) return null;
  const compressed = halves.length === 2;
  const head = groupsOf(halves[0]!, !compressed);
  const tail = compressed ? groupsOf(halves[1]!, true) : [];
  if (head === null || tail === null) return null;
  const zeros = 8 - head.length - tail.length;
  if (compressed ? zeros < 1 : zeros !== 0) return null;
  const groups = [...head, ...new Array<number>(zeros).fill(0), ...tail];
  return groups.reduce((value, group) => (value << 16n) | BigInt(group), 0n);
}

/**
 * The 16-bit groups of one side of `::`, none for an empty side. The side that ends
 * the address may end in a dotted IPv4 address, worth two groups.
 */
function groupsOf(side: string, endsAddress: boolean): number[] | null {
  if (side === "") return [];
  const parts = side.split(":");
  const groups: number[] = [];
  for (const [i, part] of parts.entries()) {
    if (endsAddress && i === parts.length - 1 && part.includes(".")) {
      const ipv4 = parseIpv4(part);
      if (ipv4 === null) return null;
      groups.push(Number(ipv4 >> 16n), Number(ipv4 & 0xffffn));
    } else if (/^[0-9A-Fa-f]{1,4}$/.test(part)) {
      groups.push(parseInt(part, 16));
    } else {
      return null;
    }
  }
  return groups;
}

/** Dotted IPv4 (from the mapped value), or RFC 5952 IPv6. */
function formatAddress(value: bigint, family: "ipv4" | "ipv6"): string {
  if (family === "ipv4") {
    return [24n, 16n, 8n, 0n].map((shift) => String((value >> shift) & 0xffn)).join(".");
  }
  if ((value >> 32n) === 0xffffn) return `::ffff:${formatAddress(value, "ipv4")}`;
  const groups = [];
  for (let shift = 112n; shift >= 0n; shift -= 16n) groups.push(Number((value >> shift) & 0xffffn));
  // RFC 5952: compress the longest run of two or more zero groups, the first if tied.
  let runStart = -1;
  let runLength = 0;
  for (let i = 0; i < groups.length;) {
    let j = i;
    while (j < groups.length && groups[j] === 0) j++;
    if (j - i > runLength && j - i >= 2) {
      runStart = i;
      runLength = j - i;
    }
    i = j === i ? i + 1 : j;
  }
  const hex = groups.map((group) => group.toString(16));
  if (runStart < 0) return hex.join(":");
  const left = hex.slice(0, runStart).join(":");
  const right = hex.slice(runStart + runLength).join(":");
  return `${left}::${right}`;
}

/** A network's prefix length in the 128-bit space. */
function spacePrefixLength(network: Pick<Network, "family" | "prefixLength">): number {
  return network.family === "ipv4"
    ? IPV6_BITS - IPV4_BITS + network.prefixLength
    : network.prefixLength;
}

/** The mask that keeps the first `length` of 128 bits. */
function prefixMask(length: number): bigint {
  return ADDRESS_MASK ^ ((1n << BigInt(IPV6_BITS - length)) - 1n);
}

/** A network ready for matching: its base and mask in the 128-bit space. */
interface Matcher {
  base: bigint;
  mask: bigint;
}

function matcherOf(network: Network): Matcher {
  const address = parseAddress(network.address);
  assert(address !== null, "a Network holds a parsed address");
  assert(address.family === network.family, "a Network's address is of its family");
  const mask = prefixMask(spacePrefixLength(network));
  assert((address.value & mask) === address.value, "a Network's address has no host bits");
  return { base: address.value, mask };
}

/** Whether the network holds any of `addresses`. */
function holdsAny(matcher: Matcher, addresses: readonly bigint[]): boolean {
  return addresses.some((address) => (address & matcher.mask) === matcher.base);
}

/** 127.0.0.0/8 (so also its mapped form ::ffff:127.0.0.0/104) and ::1/128. */
const LOOPBACK: readonly Matcher[] = [
  matcherOf({ family: "ipv4", address: "127.0.0.0", prefixLength: 8 }),
  matcherOf({ family: "ipv6", address: "::1", prefixLength: 128 }),
];

/** A Unix-socket peer counts as both 127.0.0.1 and ::1. */
const UNIX_PEER: readonly bigint[] = ["127.0.0.1", "::1"].map((text) => parseAddress(text)!.value);

/**
 * The addresses a peer counts as: one for an IP peer, both loopback addresses for a
 * Unix-socket peer (null or "unix"), none for text that is no address. The operating
 * system never gives such text; should it, the peer matches no rule, so it is refused
 * whenever there are rules.
 */
function peerAddresses(peerIp: string | null): readonly bigint[] {
  if (peerIp === null || peerIp === "unix") return UNIX_PEER;
  // A zone (`fe80::1%eth0`) says which link, not which address.
  const text = peerIp.replace(/^\[|\]$/g, "").replace(/%.*$/, "");
  const address = parseAddress(text);
  return address === null ? [] : [address.value];
}

const ACCESS_WORDS: Record<Access, string> = {
  ro: "read only",
  rw: "read and write",
  admin: "read, write and administer",
};

/** A rule as the user would write it, canonical: `backup@10.0.0.0/24=ro`. */
export function formatAllowRule(rule: AllowRule): string {
  const key = rule.keyName === null ? "" : `${rule.keyName}@`;
  return `${key}${rule.network.address}/${rule.network.prefixLength}=${rule.access}`;
}

/**
 * Who may connect and with what access, from the `--allow` rules in the order given.
 * With rules, the first rule that matches the peer's address and key decides and a
 * peer no rule matches is refused. Without rules, loopback peers (and Unix-socket
 * peers) get admin and every other peer rw.
 *
 * @example
 * ```ts
 * import assert from "node:assert/strict";
 * import { AccessPolicy, parseAllowRule } from "./allow_rules.ts";
 *
 * const policy = new AccessPolicy([
 *   parseAllowRule("backup@10.0.0.0/24=ro"),
 *   parseAllowRule("10.0.0.0/24"),
 * ]);
 * assert.equal(policy.decide("10.0.0.7", "backup"), "ro");
 * assert.equal(policy.decide("::ffff:10.0.0.7", null), "rw");
 * assert.equal(policy.addressMayConnect("192.0.2.1"), false);
 * ```
 */
export class AccessPolicy {
  readonly rules: readonly AllowRule[];
  readonly #matchers: readonly Matcher[];

  constructor(rules: readonly AllowRule[]) {
    this.rules = [...rules];
    this.#matchers = this.rules.map((rule) => matcherOf(rule.network));
  }

  /**
   * The cheap check before any handshake: whether any rule's network holds the
   * peer's address, whatever its key. Always true when there are no rules.
   */
  addressMayConnect(peerIp: string | null): boolean {
    if (this.rules.length === 0) return true;
    const addresses = peerAddresses(peerIp);
    return this.#matchers.some((matcher) => holdsAny(matcher, addresses));
  }

  /**
   * The access of a peer at `peerIp` (null or "unix" for a Unix socket) holding the
   * key `keyName` (null for none): the first matching rule's, or null to refuse.
   * A rule with a key name matches only that key; one without matches any, and none.
   */
  decide(peerIp: string | null, keyName: string | null): Access | null {
    const addresses = peerAddresses(peerIp);
    if (this.rules.length === 0) {
      return LOOPBACK.some((matcher) => holdsAny(matcher, addresses)) ? "admin" : "rw";
    }
    for (const [i, rule] of this.rules.entries()) {
      const keyMatches = rule.keyName === null || rule.keyName === keyName;
      if (keyMatches && holdsAny(this.#matchers[i]!, addresses)) return rule.access;
    }
    return null;
  }

  /** One line per rule, in order, for the start-up log; one saying the default when none. */
  describe(): string[] {
    if (this.rules.length === 0) {
      return ["no --allow rules: loopback and Unix-socket peers get admin, all others rw"];
    }
    return this.rules.map((rule, i) => {
      const who = rule.keyName === null ? "any client" : `key "${rule.keyName}"`;
      const network = `${rule.network.address}/${rule.network.prefixLength}`;
      return `rule ${i + 1}: ${who} from ${network} may ${ACCESS_WORDS[rule.access]} ` +
        `(--allow ${formatAllowRule(rule)})`;
    });
  }
}
