-- A product whose shoppers join a waiting room before the start and buy once admitted
-- (src/room.rs); off by default.
alter table product add column if not exists waiting_room boolean not null default false;
