// The filter box's text form, read into the API's filter JSON: a copy of parse_where and
// split_where in indexer/filters.py (the command line's --where), kept equal to them by
// tests/test_page_browser.py, which runs both over the same inputs.
"use strict";

const WHERE = /^\s*([A-Za-z0-9_]+)\s*(>=|<=|!=|=|>|<)\s*(.*?)\s*$/;
const OPERATORS = { "=": "eq", "!=": "ne", ">": "gt", ">=": "gte", "<": "lt", "<=": "lte" };
const INTEGER = /^[+-]?[0-9]+$/;
const DECIMAL = /^[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?$/;
const NEXT_CONDITION = /,(?=\s*[A-Za-z0-9_]+\s*(?:>=|<=|!=|=|>|<))/;
const COLUMNS = new Set(["kind", "group_id", "uri"]);
// FILE_TEXT_FIELDS in indexer/fields.py: metadata read from a user's files, always text.
const FILE_TEXT_FIELDS = new Set([
  "path", "folder", "camera_make", "camera_model", "sha256", "mtime", "taken",
]);

class WhereError extends Error {
  constructor(message) {
    super(message);
    this.name = "WhereError";
  }
}

function splitWhere(text) {
  return text.split(NEXT_CONDITION).map((part) => part.trim()).filter((part) => part);
}

function typedValue(key, text) {
  if (COLUMNS.has(key) || FILE_TEXT_FIELDS.has(key)) return text;
  if (text === "true" || text === "false") return text === "true";
  if (INTEGER.test(text)) {
    const number = Number(text);
    return Number.isSafeInteger(number) ? number : text;
  }
  if (DECIMAL.test(text)) {
    const number = Number(text);
    return Number.isFinite(number) ? number : text;
  }
  return text;
}

// null when the box is empty; a WhereError naming the condition that does not read.
function parseWhere(text) {
  const merged = {};
  for (const condition of splitWhere(text)) {
    const match = WHERE.exec(condition);
    if (!match) {
      throw new WhereError(
        `'${condition}' is not FIELD=VALUE (or !=, >, >=, <, <=; a|b for one of)`);
    }
    const [, key, symbol, value] = match;
    const operator = OPERATORS[symbol];
    const given = (merged[key] ??= {});
    if (operator === "eq" && value.includes("|")) {
      given.in = value.split("|").map((part) => typedValue(key, part));
    } else {
      given[operator] = typedValue(key, value);
    }
  }
  return Object.keys(merged).length ? merged : null;
}
