-- Products on sale and the orders their winners become (docs/guarantees.md says what each
-- constraint guarantees).
create table if not exists product (
    product_id  bigserial primary key,
    name        text not null constraint product_name_check check (length(name) between 1 and 200),
    stock       integer not null constraint product_stock_check check (stock >= 0),
    sold        integer not null default 0 constraint product_sold_check check (sold >= 0),
    price_cents bigint not null constraint product_price_check check (price_cents >= 0),
    starts_at   timestamptz not null,
    ends_at     timestamptz not null,
    created_at  timestamptz not null default now(),
    constraint product_sold_le_stock check (sold <= stock),
    constraint product_window_check check (starts_at < ends_at)
);

create table if not exists orders (
    order_id       uuid primary key,
    reservation_id uuid not null constraint orders_reservation_key unique,
    user_id        bigint not null constraint orders_user_check check (user_id > 0),
    product_id     bigint not null constraint orders_product_fkey references product (product_id),
    status         text not null default 'pending_payment'
                   constraint orders_status_check
                   check (status in ('pending_payment', 'paid', 'cancelled', 'expired')),
    reserved_at    timestamptz not null,
    created_at     timestamptz not null default now(),
    expires_at     timestamptz not null,
    paid_at        timestamptz,
    closed_at      timestamptz,
    -- set once the unit of a cancelled/expired order is back in Redis (release.lua ran)
    released_at    timestamptz,
    constraint orders_user_product_key unique (user_id, product_id)
);

-- The expiry sweeper scans unpaid orders by deadline.
create index if not exists orders_expiry_idx on orders (expires_at) where status = 'pending_payment';
-- Reconciliation finds closed orders whose unit has not been returned yet.
create index if not exists orders_unreleased_idx on orders (closed_at)
    where status in ('cancelled', 'expired') and released_at is null;
-- Live figures per product.
create index if not exists orders_product_status_idx on orders (product_id, status);
