/** HOST:PORT addresses as users type them: "host:1025", ":1025", "[::1]:1025", "1025". */

import { UsageError } from "./errors.ts";

export interface HostPort {
  hostname: string;
  port: number;
}

/**
 * Parses an address; a missing host takes `defaultHost`, a missing port `defaultPort`
 * (when there is none, the port is required).
 */
export function parseHostPort(text: string, defaultHost: string, defaultPort?: number): HostPort {
  const bad = (why: string) =>
    new UsageError(`Cannot read address "${text}": ${why} (write HOST:PORT, e.g. 127.0.0.1:1025)`);
  let host: string;
  let portText: string | undefined;
  const bracketed = /^\[([^\]]*)\](?::(.*))?$/.exec(text);
  if (bracketed !== null) {
    host = bracketed[1]!;
    if (host === "") throw bad("the brackets hold no host");
    portText = bracketed[2];
  } else if (/^\d+$/.test(text)) {
    host = "";
    portText = text;
  } else {
    const colon = text.lastIndexOf(":");
    if (colon >= 0 && text.indexOf(":") !== colon) throw bad("put an IPv6 host in brackets");
    host = colon >= 0 ? text.slice(0, colon) : text;
    portText = colon >= 0 ? text.slice(colon + 1) : undefined;
  }
  let port: number;
  if (portText === undefined || portText === "") {
    if (defaultPort === undefined) throw bad("the port is missing");
    port = defaultPort;
  } else {
    port = Number(portText);
    if (!/^\d+$/.test(portText) || port > 65535) throw bad(`"${portText}" is not a port`);
  }
  return { hostname: host === "" ? defaultHost : host, port };
}

export function formatHostPort(address: HostPort): string {
  const host = address.hostname.includes(":") ? `[${address.hostname}]` : address.hostname;
  return `${host}:${address.port}`;
}

/**
 * Whether a listening host is reachable from this machine only: a loopback address
 * (127.0.0.0/8, ::1) or "localhost". A wildcard (0.0.0.0, ::) or any other address is not.
 */
export function isLoopbackHost(hostname: string): boolean {
  const host = hostname.replace(/^\[|\]$/g, "").toLowerCase();
  return host === "localhost" || host === "::1" || /^127\.\d+\.\d+\.\d+$/.test(host);
}

/** Whether a listening host is the wildcard of every interface: 0.0.0.0 or ::. */
export function isAllInterfaces(hostname: string): boolean {
  const host = hostname.replace(/^\[|\]$/g, "");
  return host === "0.0.0.0" || host === "::" || host === "0:0:0:0:0:0:0:0";
}
