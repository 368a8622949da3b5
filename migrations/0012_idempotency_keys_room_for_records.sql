-- A key is claimed with a small row (about 130 bytes: a uuid, the key, a
-- SHA-256) and recorded moments later with the response, which makes the
-- row several times larger (a checkout's answer is about 600 bytes).
-- Packed full, a page had no room for the recorded versions of the claims
-- on it, so nearly every record moved its row to another page and added it
-- to both indexes again: in a 20,000-checkout sale, 1,467 of 20,000
-- records stayed on their page. Filled to 10%, a page takes about six
-- claims and keeps room for their records up to about 1.2 KB each, so a
-- record is a heap-only update that touches no index.
ALTER TABLE idempotency_keys SET (fillfactor = 10);
