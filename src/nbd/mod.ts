/** The NBD server of any BlockDevice: handshake.ts, transmission.ts, server.ts. */

export { type NbdListen, NbdServer, type NbdServerOptions, type NbdStatus } from "./server.ts";
