/** The NBD server of any BlockDevice: handshake.ts, transmission.ts, server.ts. */

export {
  NBD_POOL_RETAINED_BYTES,
  type NbdListen,
  NbdServer,
  type NbdServerOptions,
} from "./server.ts";
