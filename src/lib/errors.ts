/**
 * Operating errors: things that go wrong in a correct program (a peer vanishes, a
 * user names a missing file). Each has a stable `code` that scripts may match on,
 * and a message that says what happened and what to do.
 */

export class DstError extends Error {
  override name = "DstError";
  constructor(readonly code: string, message: string, options?: ErrorOptions) {
    super(message, options);
  }
}

/**
 * The command line or a config value is wrong; exit code 2. `command` is the one
 * whose usage it is ("export", "array mirror"): main.ts prints "dst COMMAND: message",
 * so a message never starts with it.
 */
export class UsageError extends DstError {
  override name = "UsageError";
  constructor(message: string, readonly command?: string) {
    super("USAGE", message);
  }
}

/** The peer broke the wire protocol; the connection is closed. */
export class ProtocolError extends DstError {
  override name = "ProtocolError";
  constructor(message: string) {
    super("PROTOCOL", message);
  }
}

/** A device refused or failed a request; `errno` is the wire error name (EIO, EPERM, ...). */
export class DeviceError extends DstError {
  override name = "DeviceError";
  constructor(readonly errno: string, message: string, options?: ErrorOptions) {
    super(errno, message, options);
  }
}

/** The connection ended, by the peer or the network. */
export class ConnectionClosedError extends DstError {
  override name = "ConnectionClosedError";
  constructor(message: string) {
    super("CONNECTION_CLOSED", message);
  }
}

/**
 * A key file is unsafe or malformed (src/lib/key_file.ts). Its message says what
 * to run, and never quotes the file's content: that may be key material.
 */
export class KeyFileError extends DstError {
  override name = "KeyFileError";
  constructor(message: string, options?: ErrorOptions) {
    super("KEY_FILE", message, options);
  }
}

/**
 * A v2 record failed its check: flipped, replayed, reordered, duplicated or cut
 * bytes. The connection closes before any byte of the record is used.
 */
export class ChannelTamperedError extends DstError {
  override name = "ChannelTamperedError";
  constructor(message: string) {
    super("TAMPERED", message);
  }
}

/** A short description of any thrown value, for log lines. */
export function describeError(error: unknown): string {
  if (error instanceof Error) return error.message;
  return String(error);
}
