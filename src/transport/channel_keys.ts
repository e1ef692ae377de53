/**
 * The cryptography of version 2's handshake (protocol README, "Version 2: keys"),
 * all WebCrypto:
 * - each side makes an ephemeral X25519 key pair per connection (forward secrecy:
 *   a key file stolen later does not open a recorded connection);
 * - the transcript hash covers both hellos, both nonces and both public keys, so a
 *   recorded connection replayed later meets a new transcript and fails;
 * - HKDF-SHA-256 over (pre-shared key || X25519 secret), salted with the transcript,
 *   gives four keys: a proof key per role and a traffic key per direction, so a
 *   proof or record reflected back to its sender never verifies.
 */

import { hkdfSync } from "node:crypto";
import { DstError } from "../lib/errors.ts";

const PROOF_LABEL = { server: "dst v2 server proof", client: "dst v2 client proof" } as const;
const CHANNEL_KEYS_INFO = new TextEncoder().encode("dst v2 channel keys");
const KEY_UPDATE_INFO = new TextEncoder().encode("dst v2 key update");

/** Bytes WebCrypto accepts: backed by a plain ArrayBuffer. */
export type Bytes = Uint8Array<ArrayBuffer>;

export type Role = keyof typeof PROOF_LABEL;

export interface Ephemeral {
  privateKey: CryptoKey;
  publicKey: Bytes;
}

export interface ChannelKeys {
  serverProof: Bytes;
  clientProof: Bytes;
  clientToServer: Bytes;
  serverToClient: Bytes;
}

export async function makeEphemeral(): Promise<Ephemeral> {
  const pair = await crypto.subtle.generateKey({ name: "X25519" }, true, [
    "deriveBits",
  ]) as CryptoKeyPair;
  const publicKey = new Uint8Array(await crypto.subtle.exportKey("raw", pair.publicKey));
  return { privateKey: pair.privateKey, publicKey };
}

/**
 * The X25519 shared secret with the peer's public key. A low-order point (which
 * would give a secret an attacker knows) is refused by WebCrypto; it fails the
 * handshake like any other bad key share.
 */
export async function sharedSecret(own: Ephemeral, peerPublic: Uint8Array): Promise<Bytes> {
  try {
    const peer = await crypto.subtle.importKey(
      "raw",
      peerPublic.slice(),
      { name: "X25519" },
      false,
      [],
    );
    return new Uint8Array(
      await crypto.subtle.deriveBits({ name: "X25519", public: peer }, own.privateKey, 256),
    );
  } catch (error) {
    throw new DstError("HANDSHAKE", "the peer's X25519 public key is not usable", {
      cause: error,
    });
  }
}

export async function transcriptHash(...parts: Uint8Array[]): Promise<Bytes> {
  const total = parts.reduce((sum, part) => sum + part.length, 0);
  const all = new Uint8Array(total);
  let at = 0;
  for (const part of parts) {
    all.set(part, at);
    at += part.length;
  }
  return new Uint8Array(await crypto.subtle.digest("SHA-256", all));
}

export async function deriveChannelKeys(
  preSharedKey: Bytes,
  secret: Bytes,
  transcript: Bytes,
): Promise<ChannelKeys> {
  const material = new Uint8Array(preSharedKey.length + secret.length);
  material.set(preSharedKey);
  material.set(secret, preSharedKey.length);
  const ikm = await crypto.subtle.importKey("raw", material, "HKDF", false, ["deriveBits"]);
  const bits = new Uint8Array(
    await crypto.subtle.deriveBits(
      { name: "HKDF", hash: "SHA-256", salt: transcript, info: CHANNEL_KEYS_INFO },
      ikm,
      4 * 256,
    ),
  );
  return {
    serverProof: bits.slice(0, 32),
    clientProof: bits.slice(32, 64),
    clientToServer: bits.slice(64, 96),
    serverToClient: bits.slice(96, 128),
  };
}

/**
 * The next traffic key of a direction, when the current one has sealed enough:
 * HKDF-SHA-256 of it. Synchronous (node:crypto), so both sides switch at the same
 * record without waiting.
 */
export function nextTrafficKey(key: Bytes): Bytes {
  return new Uint8Array(hkdfSync("sha256", key, new Uint8Array(32), KEY_UPDATE_INFO, 32));
}

function proofInput(transcript: Bytes, role: Role): Bytes {
  const label = new TextEncoder().encode(PROOF_LABEL[role]);
  const input = new Uint8Array(transcript.length + label.length);
  input.set(transcript);
  input.set(label, transcript.length);
  return input;
}

function hmacKey(key: Bytes, usage: "sign" | "verify"): Promise<CryptoKey> {
  return crypto.subtle.importKey("raw", key, { name: "HMAC", hash: "SHA-256" }, false, [usage]);
}

/** What `role` sends to prove it holds the key: HMAC(its proof key, transcript || label). */
export async function makeProof(
  keys: ChannelKeys,
  transcript: Bytes,
  role: Role,
): Promise<Bytes> {
  const key = await hmacKey(role === "server" ? keys.serverProof : keys.clientProof, "sign");
  return new Uint8Array(await crypto.subtle.sign("HMAC", key, proofInput(transcript, role)));
}

/** Checks `role`'s proof in constant time (WebCrypto's verify). */
export async function checkProof(
  keys: ChannelKeys,
  transcript: Bytes,
  role: Role,
  proof: Uint8Array,
): Promise<boolean> {
  const key = await hmacKey(role === "server" ? keys.serverProof : keys.clientProof, "verify");
  return await crypto.subtle.verify("HMAC", key, proof.slice(), proofInput(transcript, role));
}
