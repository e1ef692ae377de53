/** The NBD server of any BlockDevice: handshake.ts, transmission.ts, server.ts. */

export { type NbdListen, NbdServer, type NbdServerOptions } from "./server.ts";
