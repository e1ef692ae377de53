/**
 * Version 2's frames against the spec (README.md, "Version 2: keys"): the numbers
 * pinned, round trips, and every malformed field refused with a reason.
 */

import assert from "node:assert/strict";
import {
  decodeClientKeyShare,
  decodeClientProof,
  decodeServerKeyShare,
  encodeClientKeyShare,
  encodeClientProof,
  encodeServerKeyShare,
} from "./key_exchange.ts";
import {
  AUTH_PSK,
  ClientKeyShareLayout,
  ClientProofLayout,
  GCM_TAG_BYTES,
  MAC_TAG_BYTES,
  MAGIC_CLIENT_KEY_SHARE,
  MAGIC_CLIENT_PROOF,
  MAGIC_SERVER_KEY_SHARE,
  PROTECTION_ENCRYPT,
  PROTECTION_MAC,
  PROTOCOL_VERSION_KEYED,
  RECORD_HEADER_BYTES,
  RECORD_PLAINTEXT_BYTES_MAX,
  ServerKeyShareLayout,
} from "./wire.ts";

const ascii = (text: string) => new TextEncoder().encode(text);

Deno.test("v2 numbers are the spec's", () => {
  assert.equal(PROTOCOL_VERSION_KEYED, 2);
  assert.equal(AUTH_PSK, 2);
  assert.equal(PROTECTION_MAC, 2);
  assert.equal(PROTECTION_ENCRYPT, 4);
  assert.equal(ClientKeyShareLayout.SIZE, 104);
  assert.equal(ServerKeyShareLayout.SIZE, 88);
  assert.equal(ClientProofLayout.SIZE, 36);
  assert.equal(RECORD_HEADER_BYTES, 4);
  assert.equal(RECORD_PLAINTEXT_BYTES_MAX, 1024 * 1024);
  assert.equal(GCM_TAG_BYTES, 16);
  assert.equal(MAC_TAG_BYTES, 32);
  const share = encodeClientKeyShare({ publicKey: new Uint8Array(32).fill(9), keyName: "site" });
  assert.deepEqual(share.subarray(0, 4), ascii("DSTK"));
  assert.equal(MAGIC_CLIENT_KEY_SHARE, 0x4b545344);
  assert.deepEqual(share.subarray(36, 38), new Uint8Array([4, 0]));
  assert.deepEqual(share.subarray(40, 44), ascii("site"));
  assert.ok(share.subarray(44).every((byte) => byte === 0), "zero-padded");
  const server = encodeServerKeyShare({
    version: 2,
    protection: PROTECTION_ENCRYPT,
    nonce: new Uint8Array(16).fill(1),
    publicKey: new Uint8Array(32).fill(2),
    proof: new Uint8Array(32).fill(3),
  });
  assert.deepEqual(server.subarray(0, 4), ascii("DSTA"));
  assert.equal(MAGIC_SERVER_KEY_SHARE, 0x41545344);
  assert.deepEqual(server.subarray(4, 8), new Uint8Array([2, 0, 4, 0]));
  assert.equal(server[8], 1);
  assert.equal(server[24], 2);
  assert.equal(server[56], 3);
  const proof = encodeClientProof(new Uint8Array(32).fill(5));
  assert.deepEqual(proof.subarray(0, 4), ascii("DSTF"));
  assert.equal(MAGIC_CLIENT_PROOF, 0x46545344);
});

Deno.test("v2 frames round-trip", () => {
  const share = { publicKey: crypto.getRandomValues(new Uint8Array(32)), keyName: "a.b_c-9" };
  assert.deepEqual(decodeClientKeyShare(encodeClientKeyShare(share)), share);
  const server = {
    version: 2,
    protection: PROTECTION_MAC,
    nonce: crypto.getRandomValues(new Uint8Array(16)),
    publicKey: crypto.getRandomValues(new Uint8Array(32)),
    proof: crypto.getRandomValues(new Uint8Array(32)),
  };
  assert.deepEqual(decodeServerKeyShare(encodeServerKeyShare(server)), server);
  const proof = crypto.getRandomValues(new Uint8Array(32));
  assert.deepEqual(decodeClientProof(encodeClientProof(proof)), proof);
});

Deno.test("v2 frames with a bad field are refused with a reason", () => {
  const share = encodeClientKeyShare({ publicKey: new Uint8Array(32), keyName: "site" });
  const bad = (edit: (bytes: Uint8Array) => void) => {
    const copy = share.slice();
    edit(copy);
    return decodeClientKeyShare(copy);
  };
  assert.match(bad((b) => b[0] = 0) as string, /bad magic/);
  assert.match(bad((b) => b.set([0, 0], 36)) as string, /key name of 0 bytes/);
  assert.match(bad((b) => b.set([65, 0], 36)) as string, /key name of 65 bytes/);
  assert.match(bad((b) => b.set([0xff, 0xfe], 40)) as string, /not UTF-8/);
  assert.match(decodeClientKeyShare(share.subarray(1)) as string, /103 bytes, not 104/);

  const server = encodeServerKeyShare({
    version: 2,
    protection: PROTECTION_ENCRYPT,
    nonce: new Uint8Array(16),
    publicKey: new Uint8Array(32),
    proof: new Uint8Array(32),
  });
  const badServer = (offset: number, value: number) => {
    const copy = server.slice();
    copy[offset] = value;
    return decodeServerKeyShare(copy);
  };
  assert.match(badServer(4, 3) as string, /version 3, not 2/);
  assert.match(badServer(6, 6) as string, /neither MAC nor ENCRYPT/);
  assert.match(badServer(6, 1) as string, /neither MAC nor ENCRYPT/);
  assert.match(badServer(0, 0) as string, /bad magic/);
  assert.match(decodeClientProof(new Uint8Array(36)) as string, /bad magic/);
  assert.throws(() => encodeClientKeyShare({ publicKey: new Uint8Array(32), keyName: "" }));
});
