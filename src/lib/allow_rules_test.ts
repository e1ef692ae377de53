import assert from "node:assert/strict";
import fc from "fast-check";
import { AccessPolicy, type AllowRule, formatAllowRule, parseAllowRule } from "./allow_rules.ts";
import { UsageError } from "./errors.ts";

const FORM = "write [KEYNAME@]CIDR[=ro|rw|admin], e.g. backup@10.0.0.0/24=ro";

function policy(...rules: string[]): AccessPolicy {
  return new AccessPolicy(rules.map((rule) => parseAllowRule(rule)));
}

/** Asserts that parsing `rule` throws a UsageError with exactly `message`. */
function assertRejected(rule: string, message: string): void {
  assert.throws(() => parseAllowRule(rule), (error: unknown) => {
    assert.ok(error instanceof UsageError);
    assert.equal(error.message, message);
    return true;
  });
}

Deno.test("parseAllowRule() reads a key name, a network and an access", () => {
  assert.deepEqual(parseAllowRule("backup@10.0.0.0/24=ro"), {
    keyName: "backup",
    network: { family: "ipv4", address: "10.0.0.0", prefixLength: 24 },
    access: "ro",
  });
  assert.deepEqual(parseAllowRule("ops.team-1_x@fd00::/8=admin"), {
    keyName: "ops.team-1_x",
    network: { family: "ipv6", address: "fd00::", prefixLength: 8 },
    access: "admin",
  });
});

Deno.test("parseAllowRule() defaults to any key and rw", () => {
  assert.deepEqual(parseAllowRule("192.168.0.0/16"), {
    keyName: null,
    network: { family: "ipv4", address: "192.168.0.0", prefixLength: 16 },
    access: "rw",
  });
});

Deno.test("parseAllowRule() makes a bare address a /32 or /128", () => {
  assert.deepEqual(parseAllowRule("10.1.2.3").network, {
    family: "ipv4",
    address: "10.1.2.3",
    prefixLength: 32,
  });
  assert.deepEqual(parseAllowRule("::1").network, {
    family: "ipv6",
    address: "::1",
    prefixLength: 128,
  });
});

Deno.test("parseAllowRule() reads bracketed IPv6 with or without a prefix", () => {
  assert.deepEqual(parseAllowRule("[::1]=admin").network, {
    family: "ipv6",
    address: "::1",
    prefixLength: 128,
  });
  assert.deepEqual(parseAllowRule("k@[fd00::]/8").network, {
    family: "ipv6",
    address: "fd00::",
    prefixLength: 8,
  });
  assert.equal(parseAllowRule("::1/128").network.prefixLength, 128);
});

Deno.test("parseAllowRule() writes IPv6 networks in the RFC 5952 form", () => {
  const cases: [string, string][] = [
    ["FD00:0:0:0:0:0:0:0/8", "fd00::"],
    ["2001:db8:0:0:1:0:0:1", "2001:db8::1:0:0:1"],
    ["2001:0db8:0000:0001:0000:0000:0000:0000/64", "2001:db8:0:1::"],
    ["1:0:2:3:4:5:6:7", "1:0:2:3:4:5:6:7"],
    ["::", "::"],
    ["::/0", "::"],
    ["::ffff:10.0.0.0/104", "::ffff:10.0.0.0"],
    ["::FFFF:0a00:0001", "::ffff:10.0.0.1"],
    ["64:ff9b::192.0.2.33", "64:ff9b::c000:221"],
  ];
  for (const [written, canonical] of cases) {
    assert.equal(parseAllowRule(written).network.address, canonical, written);
  }
});

Deno.test("parseAllowRule() rejects bad rules, quoting them and saying the form", () => {
  const cases: [string, string][] = [
    ["10.0.0.0/33", "prefix length 33 is not in 0-32"],
    ["fd00::/129", "prefix length 129 is not in 0-128"],
    ["10.0.0.0/", 'prefix length "" is not a number'],
    ["10.0.0.0/-1", 'prefix length "-1" is not a number'],
    ["10.0.0.0/8/8", 'prefix length "8/8" is not a number'],
    ["10.0.0.1/24", "10.0.0.1 has bits set past the /24 prefix; did you mean 10.0.0.0/24?"],
    ["fd00::1/8", "fd00::1 has bits set past the /8 prefix; did you mean fd00::/8?"],
    ["10.0.0.256", '"10.0.0.256" is not an IPv4 or IPv6 address'],
    ["010.0.0.1", '"010.0.0.1" is not an IPv4 or IPv6 address'],
    ["10.0.0", '"10.0.0" is not an IPv4 or IPv6 address'],
    ["localhost", '"localhost" is not an IPv4 or IPv6 address'],
    ["1::2::3", '"1::2::3" is not an IPv4 or IPv6 address'],
    [":::", '":::" is not an IPv4 or IPv6 address'],
    ["1:2:3:4:5:6:7:8:9", '"1:2:3:4:5:6:7:8:9" is not an IPv4 or IPv6 address'],
    ["1:2:3:4:5:6:7:8::", '"1:2:3:4:5:6:7:8::" is not an IPv4 or IPv6 address'],
    ["1:2:3:4:5:6:7", '"1:2:3:4:5:6:7" is not an IPv4 or IPv6 address'],
    ["12345::", '"12345::" is not an IPv4 or IPv6 address'],
    ["1.2.3.4::", '"1.2.3.4::" is not an IPv4 or IPv6 address'],
    ["fe80::1%eth0", '"fe80::1%eth0" is not an IPv4 or IPv6 address'],
    ["[::1", '"[::1" is not an IPv4 or IPv6 address'],
    ["[10.0.0.1]", 'brackets hold only an IPv6 address, not "10.0.0.1"'],
    ["", "the network is missing"],
    ["backup@", "the network is missing"],
    ["backup@=ro", "the network is missing"],
    ["10.0.0.0/8=rx", 'access "rx" is not ro, rw or admin'],
    ["10.0.0.0/8=", 'access "" is not ro, rw or admin'],
    ["10.0.0.0/8=RO", 'access "RO" is not ro, rw or admin'],
    ["@10.0.0.0/8", 'key name "" is not 1 to 64 characters of A-Z a-z 0-9 . _ -'],
    ["bad key@10.0.0.0/8", 'key name "bad key" is not 1 to 64 characters of A-Z a-z 0-9 . _ -'],
    [
      `${"k".repeat(65)}@::1`,
      `key name "${"k".repeat(65)}" is not 1 to 64 characters of A-Z a-z 0-9 . _ -`,
    ],
  ];
  for (const [rule, why] of cases) assertRejected(rule, `--allow "${rule}": ${why}; ${FORM}`);
});

Deno.test("parseAllowRule() shows control characters in a bad rule as escapes", () => {
  assertRejected(
    "10.0.0.0/8\n=ro",
    `--allow "10.0.0.0/8\\x0a=ro": prefix length "8\\x0a" is not a number; ${FORM}`,
  );
});

Deno.test("formatAllowRule() writes what parseAllowRule() reads back", () => {
  for (const text of ["backup@10.0.0.0/24=ro", "::1/128=admin", "fd00::/8=rw"]) {
    const rule = parseAllowRule(text);
    assert.equal(formatAllowRule(rule), text);
    assert.deepEqual(parseAllowRule(formatAllowRule(rule)), rule);
  }
  assert.equal(formatAllowRule(parseAllowRule("10.0.0.1")), "10.0.0.1/32=rw");
});

Deno.test("AccessPolicy matches IPv4 networks exactly at their prefix boundaries", () => {
  const cases: [string, string[], string[]][] = [
    ["0.0.0.0/0", ["0.0.0.0", "255.255.255.255", "::ffff:1.2.3.4"], ["::1", "fd00::1"]],
    ["10.0.0.1/32", ["10.0.0.1", "::ffff:10.0.0.1"], ["10.0.0.0", "10.0.0.2"]],
    ["10.0.2.0/23", ["10.0.2.0", "10.0.3.255"], ["10.0.1.255", "10.0.4.0"]],
    ["10.0.0.0/8", ["10.0.0.0", "10.255.255.255"], ["9.255.255.255", "11.0.0.0"]],
    ["128.0.0.0/1", ["128.0.0.0", "255.255.255.255"], ["127.255.255.255", "0.0.0.0"]],
  ];
  for (const [rule, inside, outside] of cases) {
    const p = policy(rule);
    for (const peer of inside) assert.equal(p.addressMayConnect(peer), true, `${rule} ${peer}`);
    for (const peer of outside) assert.equal(p.addressMayConnect(peer), false, `${rule} ${peer}`);
  }
});

Deno.test("AccessPolicy matches IPv6 networks exactly at their prefix boundaries", () => {
  const cases: [string, string[], string[]][] = [
    ["::/0", ["::", "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", "::1"], []],
    ["::1/128", ["::1", "0:0:0:0:0:0:0:1"], ["::", "::2", "127.0.0.1"]],
    ["fd00::/8", ["fd00::", "fdff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"], ["fc00::1", "fe00::"]],
    [
      "2001:db8:0:0:8000::/65",
      ["2001:db8::8000:0:0:0", "2001:db8::ffff:ffff:ffff:ffff"],
      ["2001:db8::7fff:ffff:ffff:ffff", "2001:db8:0:1::"],
    ],
    ["fe80::/10", ["fe80::1", "[febf::1]", "fe80::1%eth0"], ["fec0::", "fe7f::"]],
  ];
  for (const [rule, inside, outside] of cases) {
    const p = policy(rule);
    for (const peer of inside) assert.equal(p.addressMayConnect(peer), true, `${rule} ${peer}`);
    for (const peer of outside) assert.equal(p.addressMayConnect(peer), false, `${rule} ${peer}`);
  }
});

Deno.test("AccessPolicy lets IPv4-mapped peers match IPv4 rules, and IPv4 peers mapped rules", () => {
  const v4 = policy("10.0.0.0/8=ro");
  assert.equal(v4.decide("::ffff:10.1.2.3", null), "ro");
  assert.equal(v4.decide("::FFFF:a01:203", null), "ro");
  assert.equal(v4.decide("::ffff:11.0.0.1", null), null);
  const mapped = policy("::ffff:10.0.0.0/104=ro");
  assert.equal(mapped.decide("10.1.2.3", null), "ro");
  assert.equal(mapped.decide("11.0.0.1", null), null);
});

Deno.test("AccessPolicy.decide(): the first matching rule wins", () => {
  const p = policy("10.0.0.5=admin", "10.0.0.0/24=ro", "10.0.0.0/8");
  assert.equal(p.decide("10.0.0.5", null), "admin");
  assert.equal(p.decide("10.0.0.6", null), "ro");
  assert.equal(p.decide("10.9.0.6", null), "rw");
  assert.equal(p.decide("192.0.2.1", null), null);
  const narrowLast = policy("10.0.0.0/8=ro", "10.0.0.5=admin");
  assert.equal(narrowLast.decide("10.0.0.5", null), "ro");
});

Deno.test("AccessPolicy.decide(): a keyed rule matches only its key", () => {
  const p = policy("backup@10.0.0.0/24=ro", "ops@10.0.0.0/24=admin", "10.0.0.7");
  assert.equal(p.decide("10.0.0.1", "backup"), "ro");
  assert.equal(p.decide("10.0.0.1", "ops"), "admin");
  assert.equal(p.decide("10.0.0.1", "other"), null);
  assert.equal(p.decide("10.0.0.1", null), null);
  assert.equal(p.decide("10.0.0.7", "other"), "rw");
  assert.equal(p.decide("10.0.0.7", null), "rw");
  assert.equal(p.decide("10.0.0.7", "backup"), "ro");
  assert.equal(p.decide("10.0.1.1", "backup"), null);
});

Deno.test("AccessPolicy.addressMayConnect() ignores keys: any rule's network lets a peer try", () => {
  const p = policy("backup@10.0.0.0/24=ro");
  assert.equal(p.addressMayConnect("10.0.0.1"), true);
  assert.equal(p.addressMayConnect("10.0.1.1"), false);
  assert.equal(p.decide("10.0.0.1", null), null);
});

Deno.test("AccessPolicy without rules: admin for loopback and Unix peers, rw for others", () => {
  const p = new AccessPolicy([]);
  for (const peer of ["127.0.0.1", "127.255.0.9", "::1", "::ffff:127.0.0.1", null, "unix"]) {
    assert.equal(p.decide(peer, null), "admin", String(peer));
    assert.equal(p.decide(peer, "backup"), "admin", String(peer));
  }
  for (const peer of ["10.0.0.1", "128.0.0.1", "::2", "::ffff:10.0.0.1", "fd00::1"]) {
    assert.equal(p.decide(peer, null), "rw", peer);
  }
  for (const peer of ["10.0.0.1", "::1", null, "not an address"]) {
    assert.equal(p.addressMayConnect(peer), true, String(peer));
  }
});

Deno.test("AccessPolicy with rules counts a Unix peer as 127.0.0.1 and ::1", () => {
  assert.equal(policy("127.0.0.1=ro").decide(null, null), "ro");
  assert.equal(policy("::1=ro").decide("unix", null), "ro");
  assert.equal(policy("10.0.0.0/8").decide("unix", null), null);
  assert.equal(policy("10.0.0.0/8").addressMayConnect(null), false);
  assert.equal(policy("127.0.0.0/8").addressMayConnect("unix"), true);
});

Deno.test("AccessPolicy with rules refuses a peer address it cannot read", () => {
  const p = policy("0.0.0.0/0", "::/0");
  assert.equal(p.addressMayConnect("not an address"), false);
  assert.equal(p.decide("10.0.0.256", null), null);
});

Deno.test("AccessPolicy.describe() gives one line per rule, or the default", () => {
  assert.deepEqual(policy("backup@10.0.0.0/24=ro", "[::1]=admin", "0.0.0.0/0").describe(), [
    'rule 1: key "backup" from 10.0.0.0/24 may read only (--allow backup@10.0.0.0/24=ro)',
    "rule 2: any client from ::1/128 may read, write and administer (--allow ::1/128=admin)",
    "rule 3: any client from 0.0.0.0/0 may read and write (--allow 0.0.0.0/0=rw)",
  ]);
  assert.deepEqual(new AccessPolicy([]).describe(), [
    "no --allow rules: loopback and Unix-socket peers get admin, all others rw",
  ]);
});

Deno.test("AccessPolicy keeps its own copy of the rules", () => {
  const rules: AllowRule[] = [parseAllowRule("10.0.0.0/8")];
  const p = new AccessPolicy(rules);
  rules.push(parseAllowRule("0.0.0.0/0"));
  assert.equal(p.decide("192.0.2.1", null), null);
});

// The model: an address is its 128 bits as a string of "0" and "1" (IPv4 mapped into
// ::ffff:0:0/96), and a network holds an address when their first bits are equal.
// Addresses are written out with the model's own code, sharing none with allow_rules.ts.

const MAPPED_PREFIX_BITS = "0".repeat(80) + "1".repeat(16);

function bytesOf(bits: string): number[] {
  return Array.from(
    { length: bits.length / 8 },
    (_, i) => parseInt(bits.slice(i * 8, i * 8 + 8), 2),
  );
}

/** All eight groups in full: `a:0:ff:...`. */
function ipv6Text(bits: string): string {
  const groups = [];
  for (let i = 0; i < 128; i += 16) groups.push(parseInt(bits.slice(i, i + 16), 2).toString(16));
  return groups.join(":");
}

/** The ways a peer may arrive: in full IPv6 and, for a mapped address, dotted both ways. */
function peerTexts(bits: string): string[] {
  if (!bits.startsWith(MAPPED_PREFIX_BITS)) return [ipv6Text(bits)];
  const dotted = bytesOf(bits.slice(96)).join(".");
  return [ipv6Text(bits), dotted, `::ffff:${dotted}`];
}

const bitString = (length: number) =>
  fc.array(fc.constantFrom("0", "1"), { minLength: length, maxLength: length })
    .map((bits) => bits.join(""));

/** A network in the model: its family, its 128 bits (host bits cleared) and prefixes. */
const network = fc.oneof(
  fc.tuple(bitString(32), fc.nat(32)).map(([bits, prefix]) => ({
    family: "ipv4",
    bits: (MAPPED_PREFIX_BITS + bits.slice(0, prefix)).padEnd(128, "0"),
    prefix,
    spacePrefix: 96 + prefix,
  })),
  fc.tuple(bitString(128), fc.nat(128)).map(([bits, prefix]) => ({
    family: "ipv6",
    bits: bits.slice(0, prefix).padEnd(128, "0"),
    prefix,
    spacePrefix: prefix,
  })),
);

/**
 * A network and a peer's bits: any address at all, any IPv4 one, or one that agrees
 * with the network up to a bit flipped just before or after the prefix's end, where
 * an off-by-one in a mask would show.
 */
const networkAndPeer = network.chain((net) =>
  fc.tuple(
    fc.constant(net),
    fc.oneof(
      bitString(128),
      bitString(32).map((bits) => MAPPED_PREFIX_BITS + bits),
      fc.tuple(fc.integer({ min: -2, max: 1 }), bitString(128)).map(([offset, noise]) => {
        const flip = net.spacePrefix + offset;
        // No bit to flip before a /0 or after a /128: the peer is any address, or the base.
        if (flip < 0) return noise;
        if (flip >= 128) return net.bits;
        const flipped = net.bits[flip] === "0" ? "1" : "0";
        return net.bits.slice(0, flip) + flipped + noise.slice(flip + 1);
      }),
    ),
    fc.nat(2),
  )
);

Deno.test("AccessPolicy holds an address exactly when the model's first prefix bits agree", () => {
  fc.assert(
    fc.property(networkAndPeer, ([net, peerBits, way]) => {
      const base = net.family === "ipv4"
        ? bytesOf(net.bits.slice(96)).join(".")
        : ipv6Text(net.bits);
      const p = new AccessPolicy([parseAllowRule(`${base}/${net.prefix}`)]);
      const texts = peerTexts(peerBits);
      const peerText = texts[way % texts.length]!;
      const expected = peerBits.slice(0, net.spacePrefix) === net.bits.slice(0, net.spacePrefix);
      assert.equal(p.addressMayConnect(peerText), expected, `${base}/${net.prefix} ${peerText}`);
      assert.equal(p.decide(peerText, null), expected ? "rw" : null);
    }),
    { numRuns: 3000 },
  );
});
