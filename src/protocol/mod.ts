/** The DST wire protocol: pure encode and decode, no I/O. The spec is README.md here. */

export * from "./wire.ts";
export * from "./handshake.ts";
export * from "./messages.ts";
export * from "./key_exchange.ts";
