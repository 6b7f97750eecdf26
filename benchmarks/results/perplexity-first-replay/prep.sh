#!/usr/bin/env bash
# prep.sh SEED: a copy of seed SEED's store without its confirmations of masks (the unrepaired model's kept)
set -e
s=$1; d=/work/devruns/lever/seed-$s
rm -rf $d; mkdir -p $d/seed-$s
sqlite3 /work/evalruns/seed-$s/seed-$s/store.sqlite ".backup $d/seed-$s/store.sqlite"
sqlite3 $d/seed-$s/store.sqlite "
DELETE FROM labels WHERE EXISTS (SELECT 1 FROM evaluations e WHERE e.mask_key=labels.mask_key AND e.setting=labels.setting AND e.split='confirm' AND e.source!='confirm:unrepaired');
DELETE FROM evaluations WHERE split='confirm' AND source!='confirm:unrepaired';
SELECT split, count(*) FROM evaluations GROUP BY split;"
