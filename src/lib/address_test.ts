import assert from "node:assert/strict";
import { formatHostPort, isLoopbackHost, parseHostPort } from "./address.ts";
import { UsageError } from "./errors.ts";

Deno.test("parseHostPort() reads HOST:PORT", () => {
  assert.deepEqual(parseHostPort("host:1025", "0.0.0.0"), { hostname: "host", port: 1025 });
  assert.deepEqual(parseHostPort("10.0.0.2:80", "0.0.0.0"), { hostname: "10.0.0.2", port: 80 });
});

Deno.test("parseHostPort() gives :PORT and a bare PORT the default host", () => {
  assert.deepEqual(parseHostPort(":1025", "127.0.0.1"), { hostname: "127.0.0.1", port: 1025 });
  assert.deepEqual(parseHostPort("1025", "127.0.0.1"), { hostname: "127.0.0.1", port: 1025 });
});

Deno.test("parseHostPort() reads a bracketed IPv6 host", () => {
  assert.deepEqual(parseHostPort("[::1]:1025", "0.0.0.0"), { hostname: "::1", port: 1025 });
  assert.deepEqual(parseHostPort("[fe80::1%eth0]:9", "0.0.0.0"), {
    hostname: "fe80::1%eth0",
    port: 9,
  });
  assert.deepEqual(parseHostPort("[::1]", "0.0.0.0", 1025), { hostname: "::1", port: 1025 });
});

Deno.test("parseHostPort() gives a bare host the default port", () => {
  assert.deepEqual(parseHostPort("host", "0.0.0.0", 1025), { hostname: "host", port: 1025 });
  assert.deepEqual(parseHostPort("host:", "0.0.0.0", 1025), { hostname: "host", port: 1025 });
});

Deno.test("parseHostPort() requires a port when there is no default", () => {
  assert.throws(() => parseHostPort("host", "0.0.0.0"), /port is missing/);
  assert.throws(() => parseHostPort("[::1]", "0.0.0.0"), UsageError);
});

Deno.test("parseHostPort() asks for brackets around an unbracketed IPv6 host", () => {
  assert.throws(() => parseHostPort("a:b:c", "0.0.0.0"), (error: unknown) => {
    assert.ok(error instanceof UsageError);
    assert.match(error.message, /brackets/);
    return true;
  });
  assert.throws(() => parseHostPort("::1:1025", "0.0.0.0"), UsageError);
});

Deno.test("parseHostPort() rejects ports that are not numbers from 0 to 65535", () => {
  for (const text of ["host:65536", "host:99999", "host:http", "host:-1", "host:1.5", "[::1]:x"]) {
    assert.throws(() => parseHostPort(text, "0.0.0.0", 1025), UsageError, text);
  }
  assert.throws(() => parseHostPort("70000", "0.0.0.0"), UsageError);
  assert.deepEqual(parseHostPort("host:65535", "0.0.0.0"), { hostname: "host", port: 65535 });
});

Deno.test("formatHostPort() brackets IPv6 hosts only", () => {
  assert.equal(formatHostPort({ hostname: "::1", port: 1025 }), "[::1]:1025");
  assert.equal(formatHostPort({ hostname: "127.0.0.1", port: 1025 }), "127.0.0.1:1025");
  assert.equal(formatHostPort({ hostname: "example.org", port: 80 }), "example.org:80");
});

Deno.test("formatHostPort() output parses back to the same address", () => {
  for (const address of [{ hostname: "::1", port: 1 }, { hostname: "db-1", port: 65535 }]) {
    assert.deepEqual(parseHostPort(formatHostPort(address), "0.0.0.0"), address);
  }
});

Deno.test("isLoopbackHost() is true for 127.0.0.0/8, ::1 and localhost only", () => {
  for (const host of ["127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "LOCALHOST"]) {
    assert.equal(isLoopbackHost(host), true, host);
  }
  for (
    const host of ["0.0.0.0", "::", "10.0.0.5", "128.0.0.1", "example.org", "127.0.0.1.example"]
  ) {
    assert.equal(isLoopbackHost(host), false, host);
  }
});
