/** `dst keygen FILE [--name NAME]`: adds a new random 256-bit key to a key file. */

import { UsageError } from "../lib/errors.ts";
import { addKey, isKeyName, KEY_NAME_RULE } from "../lib/key_file.ts";
import { LOG_OPTIONS_HELP, parseCommand, stringOption } from "./args.ts";
import { plural } from "../lib/plural.ts";

export const KEYGEN_HELP = `Usage: dst keygen FILE [--name NAME]

Adds a new random 256-bit key to FILE as a line NAME:HEX (64 hex digits, the format of
gnutls' psktool). FILE is created with mode 0600 if it does not exist; otherwise the key is
appended, which is how keys rotate: add a key with a new name, move both sides to it, then
delete the old line. Prints the key's name and fingerprint (the first 16 hex digits of
SHA-256 over "dst key fingerprint\\0" and the key), never the key itself.

A key file is refused if it is a symbolic link, is not yours, or group or others may read or
write it (the message says what to run), as are malformed lines and a name used twice.
Lines starting with # are comments.

  --name NAME   the key's name, ${KEY_NAME_RULE}
                (default: this host's name); a name already in FILE is refused
${LOG_OPTIONS_HELP}

Example: dst keygen ~/.config/dst/keys --name node1-2026`;

export async function keygenCommand(argv: string[]): Promise<number> {
  const parsed = parseCommand("keygen", argv, { name: { type: "string" } });
  if (parsed.values.help) {
    console.log(KEYGEN_HELP);
    return 0;
  }
  if (parsed.positionals.length !== 1) {
    throw new UsageError(`needs one FILE\n\n${KEYGEN_HELP}`, "keygen");
  }
  const path = parsed.positionals[0]!;
  const name = stringOption(parsed, "name") ?? defaultKeyName();
  if (!isKeyName(name)) {
    throw new UsageError(`--name must be ${KEY_NAME_RULE}`, "keygen");
  }
  const added = await addKey(path, name);
  const count = `${plural(added.keyCount, "key")} in the file`;
  console.log(
    `dst keygen: ${added.created ? "created" : "added to"} ${path}: key "${added.name}", ` +
      `fingerprint ${added.fingerprint} (${count})`,
  );
  return 0;
}

/** The host name, when it is a valid key name: each node's first key is named after it. */
function defaultKeyName(): string {
  const host = Deno.hostname();
  if (!isKeyName(host)) {
    throw new UsageError(
      `this host's name "${host}" cannot name a key (${KEY_NAME_RULE}); ` +
        `give --name NAME`,
      "keygen",
    );
  }
  return host;
}
