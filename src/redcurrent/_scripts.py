"""Lua scripts for state changes that must be atomic.

Cleanup keeps its own (large, cleanup-only) step script in ``cleanup.py``,
where the benchmark swaps its tail to compare trimming commands.

Each touches only keys of one topic (one hash tag), so it also runs on a
cluster. redis-py registers them once and runs them by SHA.
"""

from __future__ import annotations

from typing import Final

__all__ = [
    "ACK_DELETED",
    "CHECK_SCRIPT_ACCESS",
    "COUNT_AFTER",
    "SET_STOPPED",
    "TERMINATE",
    "SET_DELIVERY_COUNTS",
    "PUBLISH_MANY",
    "PUBLISH_MANY_KEYED",
    "PUBLISH_IDEMPOTENT",
    "DEAD_LETTER",
    "DEAD_LETTER_ESCAPE_PREFIX",
    "DEAD_LETTER_FIELD_PREFIX",
    "DELETE_IDLE_CONSUMER",
    "REFRESH_LEASE",
    "REPLAY",
]

DEAD_LETTER_FIELD_PREFIX: Final = "dlq:"
# An original field whose name starts with ``dlq:`` is stored in a dead letter
# under this prefix (``dlq:note`` as ``dlq:field:dlq:note``), so that it is not
# taken for one of the dead letter's own fields. Only names that start with
# ``dlq:field:dlq:`` are unescaped: dead letters written before the escape
# existed hold none, and read as they always did.
DEAD_LETTER_ESCAPE_PREFIX: Final = "dlq:field:"

# KEYS: stream, dead-letter stream. ARGV: group, entry id, then field/value pairs.
# Ack and copy happen together or not at all; an entry that is no longer
# pending (someone acknowledged it meanwhile) is not copied a second time.
DEAD_LETTER: Final = """
if redis.call('XACK', KEYS[1], ARGV[1], ARGV[2]) == 0 then
  return false
end
return redis.call('XADD', KEYS[2], '*', unpack(ARGV, 3))
"""

# KEYS: stream. ARGV: group, consumer, idle ms, then entry ids.
# Sets the idle time of the entries this consumer still owns: 0 renews the
# lease so that no other consumer claims a message whose handler still runs;
# claim_idle hands them back so that others may claim them at once. Entries
# another consumer took over meanwhile are left to it and reported back.
REFRESH_LEASE: Final = """
local lost = {}
local mine = {}
for i = 4, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    mine[#mine + 1] = ARGV[i]
  else
    lost[#lost + 1] = ARGV[i]
  end
end
-- Lua passes only ONE value for an unpack() that is not the last argument:
-- the ids go into one argument table, options first, ids last.
for i = 1, #mine, 500 do
  local args = {'XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0}
  for j = i, math.min(i + 499, #mine) do
    args[#args + 1] = mine[j]
  end
  args[#args + 1] = 'IDLE'
  args[#args + 1] = ARGV[3]
  args[#args + 1] = 'JUSTID'
  redis.call(unpack(args))
end
return lost
"""

# KEYS: stream. ARGV: group, consumer, then entry ids.
# Acknowledges the given entries that are pending for this consumer and whose
# stream entry no longer exists (nothing is left to handle); returns how many.
# Redis 6.2's XAUTOCLAIM claims such entries but answers nil for them.
ACK_DELETED: Final = """
local n = 0
for i = 3, #ARGV do
  if #redis.call('XRANGE', KEYS[1], ARGV[i], ARGV[i]) == 0 then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1, ARGV[2])
    if p[1] then
      n = n + redis.call('XACK', KEYS[1], ARGV[1], ARGV[i])
    end
  end
end
return n
"""

# KEYS: stream. ARGV: group, consumer, minimum idle ms.
# Deletes a consumer only if it holds no pending entry and has been idle long
# enough, checked and done in one step so that no entry it just read is lost.
DELETE_IDLE_CONSUMER: Final = """
local info = redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])
for _, c in ipairs(info) do
  local name, pending, idle
  for j = 1, #c, 2 do
    if c[j] == 'name' then name = c[j + 1]
    elseif c[j] == 'pending' then pending = c[j + 1]
    elseif c[j] == 'idle' then idle = c[j + 1] end
  end
  if name == ARGV[2] then
    if pending == 0 and idle >= tonumber(ARGV[3]) then
      return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
    end
    return -1
  end
end
return -1
"""

# KEYS: stream, dead-letter stream. ARGV: dead-letter ids.
# Writes each dead letter's original fields back to the stream as a new entry
# and removes it from the dead-letter stream; returns the new ids (false for
# ids that were not found or hold no original fields, which stay put).
# Original names are restored as DEAD_LETTER_ESCAPE_PREFIX escaped them
# (string.sub counts bytes: binary names come back unchanged).
REPLAY: Final = """
local out = {}
for i = 1, #ARGV do
  local found = redis.call('XRANGE', KEYS[2], ARGV[i], ARGV[i])
  if found[1] then
    local fields = found[1][2]
    local original = {}
    for j = 1, #fields, 2 do
      local name = fields[j]
      if string.sub(name, 1, 14) == 'dlq:field:dlq:' then
        name = string.sub(name, 11)  -- the original's own 'dlq:...' name
      elseif string.sub(name, 1, 4) == 'dlq:' then
        name = nil  -- the dead letter's own field
      end
      if name then
        original[#original + 1] = name
        original[#original + 1] = fields[j + 1]
      end
    end
    if #original > 0 then
      out[i] = redis.call('XADD', KEYS[1], '*', unpack(original))
      redis.call('XDEL', KEYS[2], ARGV[i])
    else
      out[i] = false  -- nothing to put back: the entry was gone before it died
    end
  else
    out[i] = false
  end
end
return out
"""

# KEYS: stream. ARGV: MAXLEN for ``XADD MAXLEN ~`` or "" for none, then
# (type, data, metadata) triples. Appends them in order; returns their ids.
# One script call per chunk costs the server about what the XADDs cost and
# saves the client redis-py's per-command packing and reply handling, which
# dominate a pipeline of XADDs. One key, so it also runs on a cluster.
PUBLISH_MANY: Final = """
local key = KEYS[1]
local ids = {}
local n = 0
if ARGV[1] == '' then
  for i = 2, #ARGV, 3 do
    n = n + 1
    ids[n] = redis.call('XADD', key, '*',
                        'type', ARGV[i], 'data', ARGV[i + 1], 'metadata', ARGV[i + 2])
  end
else
  for i = 2, #ARGV, 3 do
    n = n + 1
    ids[n] = redis.call('XADD', key, 'MAXLEN', '~', ARGV[1], '*',
                        'type', ARGV[i], 'data', ARGV[i + 1], 'metadata', ARGV[i + 2])
  end
end
return ids
"""

# KEYS: stream, epoch marker, then one memory key per message that has an
# idempotency key, in message order. ARGV: MAXLEN or "", window in ms, then
# (type, data, metadata, "1" keyed | "0" not) quads. A keyed message whose
# memory holds "<epoch> <id>" of the current epoch answers that id instead of
# appending; otherwise it is appended and remembered for the window (SET PX),
# in the same atomic call. ``terminate`` deletes the marker: memory written
# before it names another epoch and is ignored until it expires. Duplicates
# inside one call find the memory the first one just wrote. See _idempotency.
PUBLISH_IDEMPOTENT: Final = """
local stream = KEYS[1]
local epoch = redis.call('GET', KEYS[2])
if not epoch then
  local now = redis.call('TIME')
  epoch = now[1] .. '.' .. now[2]
  redis.call('SET', KEYS[2], epoch)
end
local ids = {}
local k = 2
local n = 0
for i = 3, #ARGV, 4 do
  n = n + 1
  local memory = false
  if ARGV[i + 3] == '1' then
    k = k + 1
    memory = KEYS[k]
    local seen = redis.call('GET', memory)
    if seen then
      local at = string.find(seen, ' ', 1, true)
      if at and string.sub(seen, 1, at - 1) == epoch then
        ids[n] = string.sub(seen, at + 1)
      end
    end
  end
  if not ids[n] then
    if ARGV[1] == '' then
      ids[n] = redis.call('XADD', stream, '*',
                          'type', ARGV[i], 'data', ARGV[i + 1], 'metadata', ARGV[i + 2])
    else
      ids[n] = redis.call('XADD', stream, 'MAXLEN', '~', ARGV[1], '*',
                          'type', ARGV[i], 'data', ARGV[i + 1], 'metadata', ARGV[i + 2])
    end
    if memory then
      redis.call('SET', memory, epoch .. ' ' .. ids[n], 'PX', ARGV[2])
    end
  end
end
return ids
"""

# KEYS: stream. ARGV: group, consumer, then (entry id, delivery count) pairs.
# Sets the delivery counter of entries this consumer still owns: deliveries
# made while a message was stopped are taken back, so that they never count
# towards max_deliveries, wherever the message is delivered next.
SET_DELIVERY_COUNTS: Final = """
local done = 0
for i = 3, #ARGV, 2 do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i],
               'RETRYCOUNT', ARGV[i + 1], 'JUSTID')
    done = done + 1
  end
end
return done
"""

# KEYS: stopped set. ARGV: channel, "stop"|"resume", entry id.
# State and announcement together: a listener that sees the message also
# finds the state, and no announcement goes out for a change that failed.
# A script's writes are not undone when a later command fails, so a user the
# ACL refuses the PUBLISH is refused before the first write (Redis >= 7.0 can
# tell; NOPERM, the code the library classifies). Below 7.0 it is not checked.
SET_STOPPED: Final = """
if redis.acl_check_cmd and not (
    redis.acl_check_cmd(ARGV[2] == 'stop' and 'SADD' or 'SREM', KEYS[1], ARGV[3])
    and redis.acl_check_cmd('PUBLISH', ARGV[1], ARGV[2])) then
  return redis.error_reply('NOPERM this user may not change ' .. KEYS[1] ..
                           ' or publish to channel ' .. ARGV[1])
end
if ARGV[2] == 'stop' then
  redis.call('SADD', KEYS[1], ARGV[3])
else
  redis.call('SREM', KEYS[1], ARGV[3])
end
redis.call('PUBLISH', ARGV[1], ARGV[2] .. ' ' .. ARGV[3])
return 1
"""

# KEYS: every owned key of the topic. ARGV: channel.
# The announcement goes first so that consumers can hear "terminate" before
# (or as) their blocked XREADGROUP fails, and both happen atomically: a user
# the ACL refuses the DEL must not stop every consumer of a topic that stays
# (checked first, as in SET_STOPPED).
TERMINATE: Final = """
if redis.acl_check_cmd and not (
    redis.acl_check_cmd('PUBLISH', ARGV[1], 'terminate')
    and redis.acl_check_cmd('DEL', unpack(KEYS))) then
  return redis.error_reply('NOPERM this user may not publish to channel ' .. ARGV[1] ..
                           ' or delete the keys of the topic')
end
redis.call('PUBLISH', ARGV[1], 'terminate')
return redis.call('DEL', unpack(KEYS))
"""

# KEYS: stream. ARGV: exclusive start id, limit.
# Counts on the server so that no payload crosses the wire.
COUNT_AFTER: Final = """
return #redis.call('XRANGE', KEYS[1], '(' .. ARGV[1], '+', 'COUNT', ARGV[2])
"""

# KEYS: stream, dead-letter stream. ARGV: group, consumer.
# A command a script sends is refused only when the script reaches it, in an
# error without a code (``ERR ... can't run this command``), often long after
# start-up. A consumer runs this once at start instead: it asks the ACL about
# every command its scripts send, as they send it, and answers NOPERM naming
# the first one refused. Redis < 7.0 has no redis.acl_check_cmd: nothing to ask.
CHECK_SCRIPT_ACCESS: Final = """
if not redis.acl_check_cmd then
  return 0
end
local s, d, g, c = KEYS[1], KEYS[2], ARGV[1], ARGV[2]
local checks = {
  {'XPENDING', s, g, '-', '+', '1', c},
  {'XCLAIM', s, g, c, '0', '0-1', 'JUSTID'},
  {'XACK', s, g, '0-1'},
  {'XRANGE', s, '-', '+'},
  {'XADD', d, '*', 'f', 'v'},
  {'XINFO', 'CONSUMERS', s, g},
  {'XGROUP', 'DELCONSUMER', s, g, c},
}
for _, args in ipairs(checks) do
  if not redis.acl_check_cmd(unpack(args)) then
    local name = args[1]
    if name == 'XINFO' or name == 'XGROUP' then
      name = name .. ' ' .. args[2]
    end
    return redis.error_reply('NOPERM this user may not run ' .. name ..
                             ' (sent inside scripts) on the keys of stream ' .. s)
  end
end
return 1
"""


# KEYS: stream. ARGV: MAXLEN ('' for none), then type, data, metadata, message
# key ('' for none) per message. PUBLISH_MANY with the ``key`` field of keyed
# messages (per-key order; see ``Message.key``).
PUBLISH_MANY_KEYED: Final = """
local key = KEYS[1]
local ids = {}
local n = 0
for i = 2, #ARGV, 4 do
  n = n + 1
  local args = {key}
  if ARGV[1] ~= '' then
    args[#args + 1] = 'MAXLEN'
    args[#args + 1] = '~'
    args[#args + 1] = ARGV[1]
  end
  args[#args + 1] = '*'
  args[#args + 1] = 'type'
  args[#args + 1] = ARGV[i]
  args[#args + 1] = 'data'
  args[#args + 1] = ARGV[i + 1]
  args[#args + 1] = 'metadata'
  args[#args + 1] = ARGV[i + 2]
  if ARGV[i + 3] ~= '' then
    args[#args + 1] = 'key'
    args[#args + 1] = ARGV[i + 3]
  end
  ids[n] = redis.call('XADD', unpack(args))
end
return ids
"""
